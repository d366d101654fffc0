"""The journal of a resumable ``camframe explain --resume`` run: one JSON line per completed image.

A record is ``{"key", "path", "stem", "entry", "files", "sha256"}``: the image's manifest entry and, for
each file it lists, ``[size, sha256]``; its own ``sha256`` hashes the other fields, so that a record is
used only as camframe wrote it (an edited entry is redone, as an edited file is). ``key`` hashes
everything that determines the image's outputs (``run_key``: model spec and weights, adapter and
options, method, layers, aggregation, classes, boxes, guided, save-maps, camframe version; then the
image's path, output stem and bytes). A record is reused only under the same key and only while its
files are there with the same sizes and hashes. Records live in
``journal/*.jsonl`` under the folder that holds the run's files (``Store``); see docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from camframe import __version__
from camframe.engine.explainer import Explainer
from camframe.output.manifest import SCHEMA
from camframe.output.folder import OutputDir, _checkpoint, _listed, recorded_files

__all__ = ["JOURNAL", "Store", "LocalStore", "run_key", "image_key", "listed", "describe", "load",
           "verified", "Resume"]

JOURNAL = "journal.jsonl"  # the committed journal in ``--out``; shards under ``journal/`` while running
_FIELDS = {"key": str, "path": str, "stem": str, "entry": dict, "files": dict}


class Store(Protocol):
    """Where a run's files and journal shards are: a local folder or a ``pyarrow`` file system."""

    def read(self, name: str) -> bytes | None: ...
    def size(self, name: str) -> int | None: ...
    def shards(self) -> list[str]: ...


class LocalStore:
    """A local folder (the resumable stage of ``OutputDir``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def size(self, name: str) -> int | None:
        try:
            return (self.root / name).stat().st_size
        except FileNotFoundError:
            return None

    def shards(self) -> list[str]:
        folder = self.root / "journal"
        return sorted(f"journal/{p.name}" for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def run_key(ex: Explainer, model: str, classes: Sequence[int] | None, boxes: Any, save_maps: bool) -> str:
    """The hash of everything but the image that determines an image's outputs (weights by value)."""
    return digest({"model": model, "weights": _fingerprint(ex.model), "adapter": ex.adapter.name,
                   "options": getattr(ex.adapter, "options", {}), "method": ex.method_name,
                   "method_options": getattr(ex, "method_options", {}), "layers": list(ex.layers),
                   "aggregate": ex.aggregate, "normalise": getattr(ex, "normalise", None),
                   "smooth": str(ex.smooth) if getattr(ex, "smooth", None) else None,
                   "classes": None if classes is None else list(classes), "boxes": repr(boxes),
                   "guided": bool(ex.guided), "save_maps": bool(save_maps), "camframe": __version__,
                   "manifest": SCHEMA})  # an entry of another manifest schema is redone


def image_key(run: str, path: str, stem: str, content: bytes) -> str:
    """An image's record key: the run's key, its path, output stem and the hash of its bytes."""
    return digest({"run": run, "path": path, "stem": stem, "image": hashlib.sha256(content).hexdigest()})


def listed(entry: dict[str, Any]) -> list[str]:
    """The file names a manifest entry points at."""
    return [n for n in dict.fromkeys(_listed([entry])) if isinstance(n, str)]


def describe(data: bytes) -> list[Any]:
    """``[size, sha256]`` of a file's bytes."""
    return [len(data), hashlib.sha256(data).hexdigest()]


def record(key: str, path: str, stem: str, entry: dict[str, Any], files: dict[str, list[Any]],
           sha256: str | None = None) -> str:
    """A journal line: the record and ``sha256``, the hash of all of it (``_sealed``); a ``sha256`` given
    (a line read back whole) is not used, the hash is made again."""
    rec = {"key": key, "path": path, "stem": stem, "entry": entry, "files": files}
    return json.dumps({**rec, "sha256": _seal(rec)}) + "\n"


def _seal(rec: dict[str, Any]) -> str:
    """The hash of a record's fields: its entry as much as its files, so that an edited entry is not reused."""
    return digest({k: rec.get(k) for k in _FIELDS})


def _sealed(rec: Any) -> bool:
    """Whether ``rec`` (a parsed line) is a record as camframe wrote it: its fields and nothing else, of their
    types, and its ``sha256`` theirs."""
    return (isinstance(rec, dict) and set(rec) == {*_FIELDS, "sha256"}
            and all(isinstance(rec[k], t) for k, t in _FIELDS.items()) and rec["sha256"] == _seal(rec))


def _records(text: str) -> Iterator[dict[str, Any] | None]:
    """Each line's record without its ``sha256``; None for a line that is not one as written (cut short
    by a kill, edited)."""
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            yield None
            continue
        yield {k: rec[k] for k in _FIELDS} if _sealed(rec) else None


def load(store: Store, extra: Sequence[str] = (), shards: bool = True) -> dict[str, dict[str, Any]]:
    """Every record of the store's journal shards (unless not ``shards``) and of its ``extra`` journal
    files, by key; the last record of a key wins. Malformed lines (cut short by a kill) and edited ones
    (their ``sha256`` not that of their fields) are skipped with one warning."""
    found: dict[str, dict[str, Any]] = {}
    bad = 0
    for name in [*(store.shards() if shards else []), *extra]:
        data = store.read(name)
        for rec in _records(data.decode(errors="replace") if data else ""):
            if rec is None:
                bad += 1
            else:
                found[rec["key"]] = rec
    if bad:
        print(f"camframe: warning: skipped {bad} malformed or edited journal line(s); those images are redone",
              file=sys.stderr)
    return found


def verified(store: Store, rec: dict[str, Any]) -> bool:
    """Whether every file of ``rec`` is in ``store`` with its recorded size and hash."""
    for name, (size, sha) in rec["files"].items():
        if store.size(name) != size:
            return False
        data = store.read(name)
        if data is None or hashlib.sha256(data).hexdigest() != sha:
            return False
    return True


class Resume:
    """The journal of one ``explain --resume`` run into ``out`` (a resumable ``OutputDir``).

    ``reuse(path, stem)`` gives the manifest entry of an image done before (its files verified and
    adopted into this run), ``add(path, stem, entry)`` journals an image once its files are written.
    A record is also reused from the last committed run's ``journal.jsonl``, its files linked back in.
    """

    def __init__(self, out: OutputDir, key: str) -> None:
        self.out, self.key = out, key
        self.stage, self.committed = LocalStore(out.staged("")), LocalStore(out.path)
        self.records = load(self.stage)
        self.previous_files = set(recorded_files(out.path))
        self.previous = load(self.committed, [JOURNAL], shards=False) if JOURNAL in self.previous_files else {}
        self._shard: Path | None = None  # made at the first record: a run that does nothing leaves nothing
        self._keys: dict[str, str] = {}
        self._used: set[str] = set()

    def _key(self, path: Path, stem: str) -> str:
        if str(path) not in self._keys:
            self._keys[str(path)] = image_key(self.key, str(path), stem, Path(path).read_bytes())
        return self._keys[str(path)]

    def reuse(self, path: Path, stem: str) -> dict[str, Any] | None:
        """The entry of ``path`` if a verified record of it is in the stage (or the last run's output)."""
        key = self._key(path, stem)
        self._used.add(key)
        rec = self.records.get(key)
        if rec is not None and verified(self.stage, rec):
            self.out.adopt(*rec["files"])
            return rec["entry"]
        rec = self.previous.get(key)
        if rec is not None and set(rec["files"]) <= self.previous_files and verified(self.committed, rec):
            for name in rec["files"]:
                self.out.adopt(name, source=self.out.path / name)
            self._write(rec)
            return rec["entry"]
        return None

    def add(self, path: Path, stem: str, entry: dict[str, Any]) -> None:
        """Journal ``path`` as done: its entry and the sizes and hashes of its (staged) files."""
        files = {}
        for name in listed(entry):
            data = self.stage.read(name)
            assert data is not None, name
            files[name] = describe(data)
        key = self._key(path, stem)
        self._used.add(key)
        self._write({"key": key, "path": str(path), "stem": stem, "entry": entry, "files": files})

    def _write(self, rec: dict[str, Any]) -> None:
        if self._shard is None:
            self.out.staged("journal").mkdir(exist_ok=True)
            self._shard = self.out.staged(f"journal/{time.time_ns()}-{os.getpid()}.jsonl")
        with open(self._shard, "a") as f:  # closed at once: a kill loses at most the line being written
            f.write(record(**rec))
        _checkpoint("journaled")

    def finish(self) -> str:
        """Stage ``journal.jsonl``: every record of this run's images that the
        journal holds, from every attempt (an image done twice shows twice)."""
        lines = []
        for name in self.stage.shards():
            for line in (self.stage.read(name) or b"").decode(errors="replace").splitlines():
                rec = next(_records(line), None)
                if rec is not None and rec["key"] in self._used:
                    lines.append(line + "\n")
        return self.out.text(JOURNAL, "".join(lines))


def _fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class and of every parameter's and buffer's name, dtype, shape and value."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, value in model.state_dict().items():
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{name}:{value!r}".encode())
    return digest.hexdigest()


def digest(parts: dict[str, Any]) -> str:
    """A resume key: the sha256 of ``parts`` as canonical JSON (``repr`` for what JSON cannot hold)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()
