"""The output transaction: a run's files appear in ``--out`` all together, or not at all.

``OUT/.camframe/`` holds camframe's state: ``lock`` (an exclusive ``flock`` held for the whole run; it holds
the pid), ``run.json`` (the files of the last committed run), ``stage-<token>/`` (a running run's files),
``commit-<token>.json`` (a commit under way; the next run finishes it if this one is killed) and
``trash-<token>/`` (the previous run's files while a commit replaces them). See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np

from camframe.core.errors import CamframeError

__all__ = ["OutputDir", "recorded_files", "write_bytes", "slug", "class_label"]

STATE = ".camframe"
_RANK = {"index.html": 1, "manifest.json": 2}  # they point at the other files: moved out first, in last
_KILL_AT = "CAMFRAME_TEST_KILL_AT"
RESUMABLE = "resume"  # the token of a resumable run: its stage, ``stage-resume/``, outlives a failed run
_passes: dict[str, int] = {}
_held: dict[int, "OutputDir"] = {}  # lock descriptor -> the OutputDir holding it (in this process)


def write_bytes(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist yet) holding ``data``; its mode follows the umask."""
    with open(path, "xb") as f:
        f.write(data)


def slug(text: str) -> str:
    """A readable, file-name-safe form of a class name: letters and digits of any script kept, every run
    of anything else (space, dot, path separators, control characters...) one ``_``; at most 60 characters."""
    return re.sub(r"(?:[^\w-]|_)+", "_", unicodedata.normalize("NFC", text)).strip("_-")[:60].strip("_-") or "class"


def class_label(class_id: int | None, name: str) -> str:
    """A class's part of a file name, unique per class id whatever the names: ``c12-person``."""
    return slug(name) if class_id is None else f"c{class_id}-{slug(name)}"


class OutputDir:
    """An output folder written as one transaction: ``with OutputDir(out) as o: o.image(...)``.

    Constructing it only validates the path. Entering creates the folder if needed, takes the lock and
    finishes or discards what a killed run left behind; files are staged in ``.camframe/``. A clean exit
    commits them (replacing the previous run's files as a unit), an exception leaves ``out`` as it was.
    A ``resumable`` run stages in ``stage-resume/``, which a failed or killed run leaves for the next
    resumable run to ``adopt`` files from (``camframe explain --resume``).
    """

    def __init__(self, path: Path, overwrite: bool = False, resumable: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.resumable = resumable
        _check_target(self.path)
        self._token = RESUMABLE if resumable else secrets.token_hex(6)
        self._names: dict[str, None] = {}
        self._live: list[tuple[Path, bool]] = []
        self._created: list[Path] = []
        self._state_created = False
        self._previous: dict[str, None] = {}
        self._lock_fd: int | None = None
        self._committed = False

    @property
    def _state(self) -> Path:
        return self.path / STATE

    @property
    def _stage(self) -> Path:
        return self._state / f"stage-{self._token}"

    def __enter__(self) -> "OutputDir":
        try:
            _make_dirs(self.path, self._created)
            self._state_created = _mkdir(self._state)
            self._lock_fd = _lock(self.path)
            _held[self._lock_fd] = self
            _recover(self.path)
            self._previous = dict.fromkeys(recorded_files(self.path, strict=True))
            self._stage.mkdir(exist_ok=self.resumable)
        except BaseException as exc:
            self._abort()
            if isinstance(exc, OSError):
                raise CamframeError(f"{self.path}: output directory is not writable ({exc.strerror or exc})") from None
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._commit()
        except BaseException:
            if not self._committed:  # else a signal held during the commit: the run is complete
                self._abort()
            raise
        finally:
            self._unlock()

    def image(self, name: str, rgb: np.ndarray, quality: int = 90) -> str:
        """Write an RGB uint8 picture (format from the suffix); returns ``name``."""
        ok, buf = cv2.imencode(Path(name).suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise CamframeError(f"{name}: cannot encode image")
        return self._put(name, buf.tobytes())

    def array(self, name: str, array: np.ndarray) -> str:
        """Write a float32 ``.npy``; returns ``name``."""
        buf = io.BytesIO()
        np.save(buf, array.astype(np.float32), allow_pickle=False)
        return self._put(name, buf.getvalue())

    def json(self, name: str, data: Any) -> str:
        """Write ``data`` as indented JSON; returns ``name``."""
        return self._put(name, (json.dumps(data, indent=2) + "\n").encode())

    def text(self, name: str, text: str) -> str:
        """Write UTF-8 text; returns ``name``."""
        return self._put(name, text.encode())

    def live(self, name: str) -> Path:
        """The path of a file written in place, outside the transaction (a resume log). A failed run
        keeps it, unless this run created it and left it empty."""
        _check_name(name)
        path = self.path / name
        self._live.append((path, path.exists()))
        return path

    def staged(self, name: str) -> Path:
        """Where ``name`` is staged (with ``""``: the stage folder)."""
        return self._stage / name

    def adopt(self, *names: str, source: Path | None = None) -> None:
        """Make files already in a resumable stage part of this run; with ``source``, the one file
        ``names`` names is first linked (or copied) there from ``source``."""
        if not self.resumable:
            raise RuntimeError("only a resumable OutputDir adopts files")
        for name in names:
            self._check_free(name)
            if source is not None:
                self.staged(name).unlink(missing_ok=True)
                try:
                    os.link(source, self.staged(name))
                except OSError:
                    shutil.copyfile(source, self.staged(name))
            self._names[name] = None

    def _put(self, name: str, data: bytes) -> str:
        if self._lock_fd is None:
            raise RuntimeError("OutputDir is written inside a with statement")
        self._check_free(name)
        path = self._stage / name
        try:
            if name in self._names or self.resumable:  # a resumable stage may hold an older copy
                path.unlink(missing_ok=True)
            write_bytes(path, data)
        except OSError as exc:
            raise CamframeError(f"{self.path / name}: cannot write ({exc.strerror or exc})") from None
        self._names[name] = None
        _checkpoint("staged")
        return name

    def _check_free(self, name: str) -> None:
        """Refuse to replace a folder, or (without ``overwrite``) a file no camframe run wrote."""
        _check_name(name)
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            raise CamframeError(f"{target}: is a folder, camframe cannot write its output there")
        if os.path.lexists(target) and name not in self._previous and not self.overwrite:
            raise CamframeError(f"{target}: exists and is not from an earlier camframe run "
                                "(use --overwrite to replace it)")

    def _commit(self) -> None:
        new = sorted(self._names)  # written by several threads: recorded in one order, whatever theirs
        for name in new:
            self._check_free(name)
        replaced = [n for n in new if n not in self._previous and os.path.lexists(self.path / n)]
        old = [*self._previous, *replaced]
        with _deferred_signals():
            _write_json(self._state / f"commit-{self._token}.json", {"token": self._token, "new": new, "old": old})
            _checkpoint("record")
            try:
                _apply(self.path, self._token, new, old)
            except OSError as exc:
                raise CamframeError(f"{self.path}: commit interrupted ({exc.strerror or exc}); the next camframe "
                                    "run into this folder finishes it") from None
            self._committed = True

    def _abort(self) -> None:
        """Undo this run: its stage, new empty resume logs, and the folders it created."""
        if (self._state / f"commit-{self._token}.json").exists():
            self._unlock()  # committing: the next run rolls it forward
            return
        if not self.resumable:
            shutil.rmtree(self._stage, ignore_errors=True)
        with contextlib.suppress(OSError):  # a resumable stage is kept for the next resumable run, unless empty
            self._stage.rmdir()
        for path, existed in self._live:
            if not existed and path.is_file() and path.stat().st_size == 0:
                path.unlink()
        if self._state_created and self._lock_fd is not None:
            (self._state / "lock").unlink(missing_ok=True)  # only the holder ever unlinks the lock
        self._unlock()
        for folder in [*([self._state] if self._state_created else []), *reversed(self._created)]:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: another run may have started here

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            _held.pop(self._lock_fd, None)
            os.close(self._lock_fd)
            self._lock_fd = None


def _check_name(name: str) -> None:
    if not _plain(name):
        raise ValueError(f"{name!r}: output names are plain file names")


def _plain(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..", STATE) and "/" not in name and "\\" not in name


def _check_target(path: Path) -> None:
    """Fail early, creating nothing, where ``path`` cannot become an output folder."""
    if path.exists() and not path.is_dir():
        raise CamframeError(f"{path}: --out is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CamframeError(f"{path}: output directory is not writable ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CamframeError(f"{path}: output directory is not writable (permission denied)")


def _mkdir(path: Path) -> bool:
    """Create ``path``; whether this call created it."""
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise
        return False
    return True


def _make_dirs(path: Path, created: list[Path]) -> None:
    """Create ``path`` and missing parents, appending those this call created to ``created``."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        if _mkdir(folder):
            created.append(folder)


def _lock(out: Path) -> int:
    """Take ``out``'s lock (fail fast, naming the holder's pid); the file descriptor holding it. A lock
    held for a run whose process is gone (by a process it left behind) is taken over with a one-line
    notice: its file is unlinked and a new one made. Taking the lock and writing the pid, or reading it
    and taking over, happen under a lock on ``.camframe/`` itself, so that a run is never taken for gone
    while it writes its pid, and two runs never take over the same file."""
    path = out / STATE / "lock"
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        with _locked(path.parent):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                if _same(fd, path):
                    if not _gone(pid):
                        os.close(fd)
                        raise CamframeError(f"{out}: another camframe run (pid {pid}) is writing here") from None
                    path.unlink()
                    print(f"camframe: warning: {out}: took over the lock of camframe run {pid}, which is gone "
                          "(a process it left held it)", file=sys.stderr)
            else:
                if _same(fd, path):  # not unlinked by a run that just failed
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    return fd
        os.close(fd)
    raise CamframeError(f"{out}: cannot lock the output folder")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` for the block, where the file system has one for folders (NFS
    emulates ``flock`` with locks that need a writable file: there the block runs without it)."""
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _same(fd: int, path: Path) -> bool:
    """Whether ``fd`` is open on the file ``path`` names now."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _gone(pid: str) -> bool:
    """Whether no process of this pid runs on this machine."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, OverflowError, OSError):
        return False
    return False


def _forget_locks() -> None:
    """In a forked child: close the lock descriptors it inherited (a flock is held while any copy is
    open), so that only the run's own process holds its lock; the child's ``OutputDir`` no longer
    holds it either."""
    for fd, holder in list(_held.items()):
        holder._lock_fd = None
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks)


def recorded_files(out: Path, strict: bool = False) -> list[str]:
    """The files camframe's last committed run put in ``out``: from ``.camframe/run.json``, or for an
    older camframe's folder, its ``manifest.json`` (if it is camframe's), ``index.html``, the files it
    lists and evaluation results. An unreadable ``run.json`` is an error if ``strict``, else nothing."""
    try:
        return _plains(json.loads((out / STATE / "run.json").read_text())["files"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        if strict:
            raise CamframeError(f"{out / STATE / 'run.json'}: unreadable; remove {out / STATE} to reset") from None
        return []
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(manifest, dict) or "camframe" not in manifest or not isinstance(manifest.get("images"), list):
        return []
    names = ["manifest.json", "index.html", *_listed(manifest["images"])]
    if (out / "evaluation.jsonl").exists():
        names += ["results.md", "results.csv"]
    return [n for n in dict.fromkeys(names) if _plain(n) and os.path.lexists(out / n)]


def _listed(entries: list[Any]) -> Iterator[Any]:
    for entry in entries:
        if isinstance(entry, dict):
            yield entry.get("overview")
            groups = [entry.get("overview_map")], entry.get("class_overview_maps"), entry.get("explanations", [])
            for e in (e for group in groups if isinstance(group, list) for e in group):
                files = e.get("files") if isinstance(e, dict) else None
                yield from files.values() if isinstance(files, dict) else ()


def _write_json(path: Path, data: Any) -> None:
    """Replace ``path`` atomically (write a ``.tmp`` beside it, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _apply(out: Path, token: str, new: list[str], old: list[str]) -> None:
    """Carry out (or finish) a commit; idempotent, so a killed commit is rolled forward by rerunning it."""
    state = out / STATE
    stage, trash = state / f"stage-{token}", state / f"trash-{token}"
    trash.mkdir(exist_ok=True)
    for name in sorted(dict.fromkeys(old), key=lambda n: -_RANK.get(n, 0)):
        if (name not in new or os.path.lexists(stage / name)) and os.path.lexists(out / name):
            os.replace(out / name, trash / name)  # an old file (a new one is still staged)
            _checkpoint("old-out")
    for name in sorted(new, key=lambda n: _RANK.get(n, 0)):
        if os.path.lexists(stage / name):
            os.replace(stage / name, out / name)
            _checkpoint("new-in")
    _write_json(state / "run.json", {"files": new})
    _checkpoint("run-json")
    shutil.rmtree(trash)
    shutil.rmtree(stage, ignore_errors=True)
    (state / f"commit-{token}.json").unlink()


def _recover(out: Path) -> None:
    """With the lock held: finish the commits a killed run left, delete its stage and trash."""
    state = out / STATE
    for path in sorted(state.glob("commit-*.json")):
        try:
            record = json.loads(path.read_text())
            token, new, old = record["token"], record["new"], record["old"]
        except (ValueError, KeyError, TypeError):
            raise CamframeError(f"{path}: unreadable commit record; remove {state} to reset") from None
        _apply(out, token, _plains(new), _plains(old))
    for path in state.iterdir():
        if path.name.startswith(("stage-", "trash-")) and path.name != f"stage-{RESUMABLE}":
            shutil.rmtree(path)
        elif path.name.endswith(".tmp"):
            path.unlink()


def _plains(names: Iterable[Any]) -> list[str]:
    return [n for n in names if _plain(n)]


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first that came (main thread only,
    where Python handles signals)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, signals):
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda n, _: pending.append(n)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def _checkpoint(point: str) -> None:
    """Fault injection for the tests: ``CAMFRAME_TEST_KILL_AT=point[#n]:SIGNAL`` sends SIGNAL (default
    SIGKILL) to this process the n-th time (default first) it passes ``point``; ``:-SIGNAL`` sends it to
    the process group instead, as a terminal's Ctrl-C or ``kill -TERM -PGID`` do."""
    spec = os.environ.get(_KILL_AT)
    if not spec:
        return
    where, _, sig = spec.partition(":")
    name, _, nth = where.partition("#")
    if name == point:
        _passes[point] = _passes.get(point, 0) + 1
        if _passes[point] == int(nth or 1):
            number = getattr(signal, sig.lstrip("-") or "SIGKILL")
            if sig.startswith("-"):
                os.killpg(0, number)
            else:
                os.kill(os.getpid(), number)
