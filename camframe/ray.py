"""Explain a dataset of images on a Ray cluster with Ray Data (``pip install "camframe[ray]"``; docs/scale.md).

```python
import ray, camframe.ray
ds = ray.data.read_binary_files("s3://bucket/val/", include_paths=True)  # or a list of image paths
manifest = camframe.ray.explain(ds, "s3://bucket/cams/", model="best.pt")
```

Each actor of a pool builds one ``Explainer`` (one GPU each where the cluster has GPUs) and writes each
image's files and a journal shard per batch under ``out``; images already in the journal, with their files
intact, are skipped (the same journal as ``camframe explain --resume``). The driver consolidates the
journal into ``journal.jsonl`` and ``manifest.json``: the same files as a single-process run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import numpy as np
import torch
from tqdm import tqdm

from camframe.plugins import manager as _plugins
from camframe.core import validate as _validate
from camframe.output.writer import _manifest_head, _nothing_to_explain, _stems, _write_image
from camframe.adapters.detector import Boxes, select_boxes
from camframe.core.errors import CamframeError
from camframe.engine.explainer import Explainer
from camframe.core.images import decode_image
from camframe.output.journal import JOURNAL, describe, image_key, listed, load, record, run_key, verified
from camframe.output.folder import OutputDir, recorded_files

try:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError('camframe.ray needs Ray Data: pip install "camframe[ray]"') from exc

__all__ = ["explain", "connect"]


@dataclass
class _Job:
    """What every actor is sent: the model spec and the bytes of the local files it names, the
    explainer's resolved settings, the run's key, output stems and the keys already done."""

    model: str
    weights: str | None
    files: dict[str, tuple[str, Any]]  # "model"/"weights" -> (file name, its bytes in the object store)
    settings: dict[str, Any]
    classes: list[int] | None
    boxes: Boxes | None
    save_maps: bool
    device: str
    run: str
    stems: dict[str, str]
    done: set[str]
    root: str
    filesystem: Any
    batch: int = 8  # images per forward pass: the local run's batches of the input list, each in one pass
    order: dict[str, int] = field(default_factory=dict)  # each path's place in the input list
    threads: int = field(default_factory=torch.get_num_threads)  # the driver's: what a local run computes with
    cwd: str = field(default_factory=os.getcwd)


class _Store:
    """A folder on a ``pyarrow`` file system: where an actor writes, and what the journal reads."""

    def __init__(self, filesystem: Any, root: str) -> None:
        self.fs, self.root = filesystem, root.rstrip("/")

    def _at(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._at(name)) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def size(self, name: str) -> int | None:
        info = self.fs.get_file_info(self._at(name))
        return info.size if info.type == pafs.FileType.File else None

    def shards(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self._at("journal"), allow_not_found=True))
        return sorted(f"journal/{i.base_name}" for i in infos if i.base_name.endswith(".jsonl"))

    def write(self, name: str, data: bytes) -> None:
        self.fs.create_dir(os.path.dirname(self._at(name)), recursive=True)
        with self.fs.open_output_stream(self._at(name)) as f:
            f.write(data)


class _Sink:
    """What ``_write_image`` writes to in an actor: ``OutputDir``'s encoders, the bytes to a ``_Store``,
    each file's size and hash kept for the journal."""

    image = OutputDir.image
    array = OutputDir.array

    def __init__(self, store: _Store) -> None:
        self.store = store
        self.files: dict[str, list[Any]] = {}

    def _put(self, name: str, data: bytes) -> str:
        self.store.write(name, data)
        self.files[name] = describe(data)
        return name


class _Actor:
    """One ``Explainer`` per actor; ``__call__`` explains a batch of rows (``path``, maybe ``bytes``)."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        torch.set_num_threads(job.threads)  # Ray gives a worker one thread a CPU: other sums, other last digits
        folder = tempfile.mkdtemp(prefix="camframe-")
        spec, weights = job.model, job.weights
        for role, (name, data) in job.files.items():  # local files named on the driver, shipped by value
            Path(folder, name).write_bytes(ray.get(data))
            spec, weights = (str(Path(folder, name)), weights) if role == "model" else (spec, str(Path(folder, name)))
        model = _plugins.load_model(spec, weights, job.device)
        self.ex = Explainer(model, **job.settings).__enter__()  # for the actor's life: the model is its own copy
        if run_key(self.ex, job.model, job.classes, job.boxes, job.save_maps) != job.run:
            raise CamframeError(f"{job.model}: a Ray worker built another model than the driver (random weights?)")
        self.store = _Store(job.filesystem, job.root)
        self.batches = 0

    def _read(self, path: str) -> bytes:
        if "://" in path:
            filesystem, inner = pafs.FileSystem.from_uri(path)
            with filesystem.open_input_stream(inner) as f:
                return f.read()
        return Path(self.job.cwd, path).read_bytes()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows ``path``, ``key``, ``record`` (a journal line; empty where the driver has it) and ``error``
        (a ``CamframeError``'s one line, handed to the driver to raise, instead of Ray's wrapped traceback)."""
        paths = [str(p) for p in batch["path"]]
        try:
            keys, out = self._explain(batch, paths)
        except CamframeError as exc:
            return _column(paths=paths, keys=[""] * len(paths), out=[""] * len(paths), error=str(exc))
        return _column(paths=paths, keys=keys, out=out, error="")

    def _explain(self, batch: dict[str, np.ndarray], paths: list[str]) -> tuple[list[str], list[str]]:
        job = self.job
        data = [bytes(b) for b in batch["bytes"]] if "bytes" in batch else [self._read(p) for p in paths]
        keys = [image_key(job.run, p, job.stems[p], d) for p, d in zip(paths, data)]
        out = ["" if k in job.done else None for k in keys]  # a reused image: the driver has its record
        todo = [i for i, k in enumerate(keys) if k not in job.done]
        several = bool(job.classes) and len(job.classes) > 1
        for group in _groups(todo, [job.order[p] for p in paths], job.batch):  # a forward pass each
            images = [decode_image(data[i], paths[i]) for i in group]
            result = self.ex(images, target=job.classes, boxes=job.boxes)
            for n, i in enumerate(group):
                sink = _Sink(self.store)
                entry = _write_image(sink, job.save_maps, self.ex, result, n, paths[i],  # type: ignore[arg-type]
                                     images[n], job.stems[paths[i]], several)
                files = {name: sink.files[name] for name in listed(entry)}  # as a local run journals them
                out[i] = record(keys[i], paths[i], job.stems[paths[i]], entry, files)
        if todo:
            self.batches += 1
            shard = f"journal/{time.time_ns()}-{os.getpid()}-{self.batches}.jsonl"
            self.store.write(shard, "".join(out[i] for i in todo).encode())  # type: ignore[misc]
        return keys, out  # type: ignore[return-value]


def _groups(rows: list[int], places: list[int], batch: int) -> list[list[int]]:
    """``rows`` grouped as a local run batches them: by ``places[row] // batch``, in input order."""
    groups: dict[int, list[int]] = {}
    for i in sorted(rows, key=lambda i: places[i]):
        groups.setdefault(places[i] // batch, []).append(i)
    return list(groups.values())


def _column(paths: list[str], keys: list[str], out: list[str], error: str) -> dict[str, np.ndarray]:
    return {"path": np.array(paths, dtype=object), "key": np.array(keys, dtype=object),
            "record": np.array(out, dtype=object), "error": np.array([error] * len(paths), dtype=object)}


def connect(address: str | None = "local", verbose: bool = False, timeout: float = 10) -> None:
    """Join a Ray cluster: ``auto`` (the one this machine belongs to), an address (``ray://host:10001``,
    ``host:6379``), or ``local``/None (start one here, unless ``RAY_ADDRESS`` names one). Nothing happens
    if Ray is already initialised. An address where nothing answers within ``timeout`` seconds, or
    something other than a gRPC server, is an error at once (``ray.init`` would retry for good); Ray's
    logs below errors show only if ``verbose``."""
    if ray.is_initialized():
        return
    address = None if address in (None, "local") else address
    joined = address or os.environ.get("RAY_ADDRESS") or None  # what ray.init joins (else: starts one here)
    saved = os.environ.get("RAY_gcs_server_port_wait_time_s")
    if joined is not None and saved is None:
        os.environ["RAY_gcs_server_port_wait_time_s"] = "1"  # one try to reach its GCS (each ~40 s), not 20
    try:
        with _core_lines_dropped(not verbose):
            if joined is not None:
                _reachable(joined, timeout)
            ray.init(address=address or "local", log_to_driver=verbose,
                     logging_level=logging.INFO if verbose else logging.ERROR)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise CamframeError(f"cannot connect to the Ray cluster {joined or 'local'!r}: "
                            f"{str(exc).splitlines()[0]}") from None
    finally:
        if saved is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)


def _reachable(address: str, timeout: float) -> None:
    """A ``ConnectionError`` unless a gRPC server (a Ray cluster's GCS or client server) answers at
    ``address`` (``auto`` resolved as ``ray.init`` resolves it) within ``timeout`` seconds: its first
    HTTP/2 frame, a SETTINGS frame, to our connection preface (plaintext; not checked with RAY_USE_TLS)."""
    from ray._private.services import canonicalize_bootstrap_address

    bootstrap = address.removeprefix("ray://") if address.startswith("ray://") else \
        canonicalize_bootstrap_address(address)
    if bootstrap is None:
        raise ConnectionError("no running Ray cluster was found (start one with `ray start --head`)")
    host, _, port = bootstrap.rpartition(":")
    head = bytes([0, 0, 0, 4]) + bytes(5)  # what a TLS cluster is taken to answer
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                sock.sendall(_H2_PREFACE)
                head = b""
                while len(head) < 9 and (chunk := sock.recv(9 - len(head))):
                    head += chunk
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {bootstrap} ({exc.strerror or exc})") from None
    if len(head) < 9 or head[3] != 4:
        raise ConnectionError(f"what answers at {bootstrap} is not a Ray cluster (no gRPC)")


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[TextIO]:
    """Unless ``verbose``: Ray Data's progress bars and logs below errors off, and Ray's C++ lines
    dropped (``_core_lines_dropped``); as they were, after. Gives the stderr to write progress to."""
    context, logger = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    saved = context.enable_progress_bars, context.print_on_execution_start, logger.level
    if not verbose:
        context.enable_progress_bars = context.print_on_execution_start = False
        logger.setLevel(logging.ERROR)
    try:
        with _core_lines_dropped(not verbose) as stderr:
            yield stderr
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved[:2]
        logger.setLevel(saved[2])


@contextlib.contextmanager
def _core_lines_dropped(drop: bool = True) -> Iterator[TextIO]:
    """If ``drop``, the lines of Ray's C++ core (``[date time W pid tid] file.cc:n: ...``: connection
    retries, a warning on Ray Data's own actor arguments) dropped from this process's stderr (fd 2), all
    else passed on. Gives a stream on the real stderr (for progress bars)."""
    if not drop:
        yield sys.stderr
        return
    sys.stderr.flush()
    stderr, (read, write) = os.dup(2), os.pipe()
    os.dup2(write, 2)
    os.close(write)
    pump = threading.Thread(target=_pass_on, args=(read, stderr), daemon=True)
    pump.start()
    try:
        with os.fdopen(os.dup(stderr), "w", buffering=1) as progress:
            yield progress
    finally:
        sys.stderr.flush()
        os.dup2(stderr, 2)  # the pipe's last writer closed: the pump ends
        pump.join(5)
        os.close(stderr)


_RAY_CORE_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] ")


def _pass_on(read: int, stderr: int) -> None:
    """Copy the lines of pipe ``read`` to ``stderr``, but those of Ray's C++ core."""
    with os.fdopen(read, "rb") as lines:
        for line in lines:
            if not _RAY_CORE_LINE.match(line):
                os.write(stderr, line)


def _shipped(model: str, weights: str | None) -> dict[str, tuple[str, bytes]]:
    """The model checkpoint and weights files named on the driver, by value (workers may not see them)."""
    if weights == "random":
        raise CamframeError("--weights random draws other weights in every Ray worker; save them to a file")
    files = {}
    for role, value in (("model", model), ("weights", weights)):  # by reference: small actor arguments
        if value and Path(value).is_file():
            files[role] = (Path(value).name, ray.put(Path(value).read_bytes()))
    return files


def _settings(ex: Explainer) -> dict[str, Any]:
    """The driver's explainer, resolved, as keyword arguments for the actors' ``Explainer``."""
    return {"adapter": ex.adapter.name, "options": dict(getattr(ex.adapter, "options", {})),
            "layers": list(ex.layers), "method": ex.method_name, "aggregate": ex.aggregate,
            "normalise": ex.normalise, "guided": ex.guided, "method_options": dict(ex.method_options),
            "smooth": ex.smooth and str(ex.smooth), "group": ex._support is not None}


def _verified(store: _Store, stems: dict[str, str], extra: Sequence[str] = (),
              files: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """The journal records in ``store`` (its shards, or only the ``extra`` journals with ``files``) of
    this run's images whose files are there intact (and among ``files``, if given), by key."""
    return {k: r for k, r in load(store, extra, shards=files is None).items() if stems.get(r["path"]) == r["stem"]
            and (files is None or set(r["files"]) <= files) and verified(store, r)}


def _run(dataset: Any, paths: list[str], ex: Explainer, job: _Job, actors: int | None, batch_size: int | None,
         num_gpus: float | None, done: dict[str, dict[str, Any]], verbose: bool = False,
         quiet: bool = True) -> tuple[dict, list[str]]:
    """Explain ``dataset`` (None: ``paths``) on actors, skipping the images of the verified records ``done``;
    the manifest (without ``model``) and the journal lines of this run's images, in input order."""
    job.done = set(done)
    resources = ray.cluster_resources()
    gpus = num_gpus if num_gpus is not None else (1 if resources.get("GPU", 0) else 0)
    job.batch = batch_size or (8 if gpus else ex.adapter.cpu_batch_size)  # default_batch_size on the actors
    job.order = {p: i for i, p in enumerate(paths)}
    if dataset is None:  # a block per local batch: no Ray batch splits one
        dataset = ray.data.from_arrow([pa.table({"path": paths[i:i + job.batch]})
                                       for i in range(0, len(paths), job.batch)])
    cpus = max(1, int(resources.get("CPU", 1)) // job.threads)  # each CPU actor computes with job.threads
    actors = actors or (max(1, int(resources.get("GPU", 0))) if gpus else cpus)
    records: dict[str, dict[str, Any]] = {}
    with _quiet(verbose) as stderr, tqdm(total=len(paths), unit="image", disable=quiet or None, file=stderr) as bar:
        rows = dataset.map_batches(_Actor, fn_constructor_kwargs={"job": job}, batch_size=job.batch,
                                   batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                                   num_gpus=gpus, num_cpus=0 if gpus else 1)
        for row in rows.iter_rows():
            if row["error"]:
                raise CamframeError(row["error"])
            records[row["path"]] = json.loads(row["record"]) if row["record"] else done[row["key"]]
            bar.update(1)
    missing = [p for p in paths if p not in records]
    if missing:
        raise CamframeError(f"{missing[0]}: no result came back from the Ray workers")
    entries = [records[p]["entry"] for p in paths]
    device = job.device if job.device != "auto" else "cuda" if gpus else "cpu"  # where the actors ran
    manifest = {**_manifest_head(ex, device), "images": entries}
    return manifest, [record(**records[p]) for p in paths]


def explain_into(out: OutputDir, *, ex: Explainer, paths: Sequence[Path], classes: list[int] | None,
                 boxes: Boxes | None, address: str | None, model: str, weights: str | None, save_maps: bool,
                 device: str, batch_size: int | None, verbose: bool = False, quiet: bool = True) -> dict[str, Any]:
    """``camframe explain --ray [ADDRESS]``: ``paths`` into ``out`` (a resumable ``OutputDir``); the manifest."""
    connect(address, verbose)
    return _into_outputdir(None, [str(p) for p in paths], out, ex, model, weights, classes, boxes,
                           save_maps, device, None, batch_size, None, verbose, quiet)


def _into_outputdir(dataset: Any, paths: list[str], out: OutputDir, ex: Explainer, model: str,
                    weights: str | None, classes: list[int] | None, boxes: Boxes | None, save_maps: bool,
                    device: str, actors: int | None, batch_size: int | None, num_gpus: float | None,
                    verbose: bool = False, quiet: bool = True) -> dict[str, Any]:
    """A run into a local ``OutputDir``: actors write into its resumable stage; the driver adopts the files
    (linking back those of the last committed run that it reuses) and stages ``journal.jsonl``."""
    store = _Store(pafs.LocalFileSystem(), str(out.staged("").resolve()))
    stems = dict(zip(paths, _stems([Path(p) for p in paths]).values()))
    staged = _verified(store, stems)
    before = set(recorded_files(out.path))
    committed = _Store(pafs.LocalFileSystem(), str(out.path.resolve()))
    previous = _verified(committed, stems, [JOURNAL], before) if JOURNAL in before else {}
    job = _Job(model, weights, _shipped(model, weights), _settings(ex), classes, boxes, save_maps, device,
               run_key(ex, model, classes, boxes, save_maps), stems, set(), store.root, pafs.LocalFileSystem())
    manifest, lines = _run(dataset, paths, ex, job, actors, batch_size, num_gpus, {**previous, **staged},
                           verbose, quiet)
    for entry, line in zip(manifest["images"], lines):
        linked = json.loads(line)["key"] in previous.keys() - staged.keys()  # the last run's files, linked back
        for name in listed(entry):
            out.adopt(name, source=out.path / name if linked else None)
    out.text(JOURNAL, "".join(lines))
    return manifest


def explain(images: Any, out: str | os.PathLike, *, model: str, weights: str | None = None,
            adapter: str | None = None, options: dict[str, Any] | None = None, layers: Sequence[str] | None = None,
            method: str | None = None, aggregate: str | None = None, normalise: str | None = None,
            classes: Sequence[str | int] | None = None, boxes: Any = None, guided: bool | None = None,
            method_options: dict[str, Any] | None = None, smooth: str | None = None, save_maps: bool = False,
            batch_size: int | None = None, actors: int | None = None, num_gpus: float | None = None,
            device: str = "auto", overwrite: bool = False, filesystem: Any = None,
            verbose: bool = False) -> dict[str, Any]:
    """Explain ``images`` (a ``ray.data.Dataset`` with a ``path`` column and, optionally, ``bytes``, as
    ``read_binary_files(..., include_paths=True)`` gives; or a list of paths) into ``out``: a local
    folder (the output transaction of ``camframe explain``), or any ``pyarrow`` file system path
    (``s3://...``, or ``filesystem`` given). ``actors`` defaults to the cluster's GPUs, else its CPUs;
    ``num_gpus`` per actor to 1 where the cluster has GPUs. Rerun, it resumes. Returns the manifest."""
    if batch_size is not None and batch_size < 1:
        raise CamframeError("batch_size must be at least 1")
    connect(None, verbose)
    ex = Explainer(_plugins.load_model(model, weights, "cpu"), adapter=adapter, options=options, layers=layers,
                   method=method, aggregate=aggregate, normalise=normalise, guided=guided,
                   method_options=method_options, smooth=smooth)
    ids = None if classes is None else _validate.class_ids([str(c) for c in classes], ex.adapter, ex.model)
    picked = select_boxes(ex.adapter, boxes)
    if isinstance(images, ray.data.Dataset):
        dataset, paths = images, _ordered_paths(images)
    else:
        dataset, paths = None, [str(p) for p in images]
    target = str(out)
    if filesystem is None and "://" not in target:
        with OutputDir(Path(target), overwrite, resumable=True) as o:
            manifest = _into_outputdir(dataset, paths, o, ex, model, weights, ids, picked, save_maps, device, actors,
                                       batch_size, num_gpus, verbose)
            _finish(manifest, model, picked)
            o.json("manifest.json", manifest)
        return manifest
    fs, root = (filesystem, target) if filesystem is not None else pafs.FileSystem.from_uri(target)
    store = _Store(fs, root)
    stems = dict(zip(paths, _stems([Path(p) for p in paths]).values()))
    job = _Job(model, weights, _shipped(model, weights), _settings(ex), ids, picked, save_maps, device,
               run_key(ex, model, ids, picked, save_maps), stems, set(), store.root, fs)
    manifest, lines = _run(dataset, paths, ex, job, actors, batch_size, num_gpus, _verified(store, stems, [JOURNAL]),
                           verbose)
    _finish(manifest, model, picked)
    store.write(JOURNAL, "".join(lines).encode())
    store.write("manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())  # last: the run is complete
    return manifest


def _ordered_paths(dataset: Any) -> list[str]:
    """The dataset's ``path`` column in the dataset's own order (the manifest's order)."""
    options = ray.data.DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True
    try:
        return [str(r["path"]) for r in dataset.select_columns(["path"]).take_all()]
    finally:
        options.preserve_order = saved


def _finish(manifest: dict[str, Any], model: str, boxes: Boxes | None) -> None:
    if not any(e["explanations"] for e in manifest["images"]):
        raise CamframeError(_nothing_to_explain(manifest["images"], boxes))
    manifest["model"] = model
