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

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _plugins, _validate
from ._cli import _manifest_head, _nothing_to_explain, _stems, _write_image
from ._detector import Boxes, select_boxes
from ._errors import CamframeError
from ._explainer import Explainer
from ._images import decode_image
from ._journal import JOURNAL, describe, image_key, listed, load, record, run_key, verified
from ._output import OutputDir, recorded_files

try:
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
    files: dict[str, tuple[str, bytes]]  # "model"/"weights" -> (file name, bytes)
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
        folder = tempfile.mkdtemp(prefix="camframe-")
        spec, weights = job.model, job.weights
        for role, (name, data) in job.files.items():  # local files named on the driver, shipped by value
            Path(folder, name).write_bytes(data)
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
        if todo:
            images = [decode_image(data[i], paths[i]) for i in todo]
            result = self.ex(images, target=job.classes, boxes=job.boxes)
            several = bool(job.classes) and len(job.classes) > 1
            for n, i in enumerate(todo):
                sink = _Sink(self.store)
                entry = _write_image(sink, job.save_maps, self.ex, result, n, paths[i],  # type: ignore[arg-type]
                                     images[n], job.stems[paths[i]], several)
                out[i] = record(keys[i], paths[i], job.stems[paths[i]], entry, sink.files)
            self.batches += 1
            shard = f"journal/{time.time_ns()}-{os.getpid()}-{self.batches}.jsonl"
            self.store.write(shard, "".join(out[i] for i in todo).encode())  # type: ignore[misc]
        return keys, out  # type: ignore[return-value]


def _column(paths: list[str], keys: list[str], out: list[str], error: str) -> dict[str, np.ndarray]:
    return {"path": np.array(paths, dtype=object), "key": np.array(keys, dtype=object),
            "record": np.array(out, dtype=object), "error": np.array([error] * len(paths), dtype=object)}


def connect(address: str | None = "local") -> None:
    """Join a Ray cluster: ``auto`` (the one this machine belongs to), an address (``ray://host:10001``,
    ``host:6379``), or ``local``/None (start one here). Nothing happens if Ray is already initialised."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address in (None, "local") else address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise CamframeError(f"cannot connect to the Ray cluster {address!r}: {str(exc).splitlines()[0]}") from None


def _shipped(model: str, weights: str | None) -> dict[str, tuple[str, bytes]]:
    """The model checkpoint and weights files named on the driver, by value (workers may not see them)."""
    if weights == "random":
        raise CamframeError("--weights random draws other weights in every Ray worker; save them to a file")
    files = {}
    for role, value in (("model", model), ("weights", weights)):
        if value and Path(value).is_file():
            files[role] = (Path(value).name, Path(value).read_bytes())
    return files


def _settings(ex: Explainer) -> dict[str, Any]:
    """The driver's explainer, resolved, as keyword arguments for the actors' ``Explainer``."""
    return {"adapter": ex.adapter.name, "options": dict(getattr(ex.adapter, "options", {})),
            "layers": list(ex.layers), "method": ex.method_name, "aggregate": ex.aggregate,
            "normalise": ex.normalise, "guided": ex.guided, "method_options": dict(ex.method_options),
            "smooth": ex.smooth and str(ex.smooth)}


def _verified(store: _Store, stems: dict[str, str], extra: Sequence[str] = (),
              files: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """The journal records in ``store`` (its shards, or only the ``extra`` journals with ``files``) of
    this run's images whose files are there intact (and among ``files``, if given), by key."""
    return {k: r for k, r in load(store, extra, shards=files is None).items() if stems.get(r["path"]) == r["stem"]
            and (files is None or set(r["files"]) <= files) and verified(store, r)}


def _run(dataset: Any, paths: list[str], ex: Explainer, job: _Job, actors: int | None, batch_size: int,
         num_gpus: float | None, done: dict[str, dict[str, Any]]) -> tuple[dict, list[str]]:
    """Explain ``dataset`` on actors, skipping the images of the verified records ``done``; the manifest
    (without ``model``) and the journal lines of this run's images, in input order."""
    job.done = set(done)
    resources = ray.cluster_resources()
    gpus = num_gpus if num_gpus is not None else (1 if resources.get("GPU", 0) else 0)
    actors = actors or max(1, int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", 1)))
    rows = dataset.map_batches(_Actor, fn_constructor_kwargs={"job": job}, batch_size=batch_size,
                               batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                               num_gpus=gpus, num_cpus=0 if gpus else 1)
    records: dict[str, dict[str, Any]] = {}
    for row in rows.iter_rows():
        if row["error"]:
            raise CamframeError(row["error"])
        records[row["path"]] = json.loads(row["record"]) if row["record"] else done[row["key"]]
    missing = [p for p in paths if p not in records]
    if missing:
        raise CamframeError(f"{missing[0]}: no result came back from the Ray workers")
    entries = [records[p]["entry"] for p in paths]
    device = job.device if job.device != "auto" else "cuda" if gpus else "cpu"  # where the actors ran
    manifest = {**_manifest_head(ex, device), "images": entries}
    return manifest, [record(**records[p]) for p in paths]


def explain_cli(args: Any, out: OutputDir, ex: Explainer, paths: Sequence[Path], classes: list[int] | None,
                boxes: Boxes | None) -> dict[str, Any]:
    """``camframe explain --ray [ADDRESS]``: ``paths`` into ``out`` (a resumable ``OutputDir``)."""
    connect(args.ray)
    names = [str(p) for p in paths]
    dataset = ray.data.from_items([{"path": p} for p in names])
    return _into_outputdir(dataset, names, out, ex, args.model, args.weights, classes, boxes, args.save_maps,
                           args.device, None, 8 if args.batch_size is None else args.batch_size, None)


def _into_outputdir(dataset: Any, paths: list[str], out: OutputDir, ex: Explainer, model: str,
                    weights: str | None, classes: list[int] | None, boxes: Boxes | None, save_maps: bool,
                    device: str, actors: int | None, batch_size: int, num_gpus: float | None) -> dict[str, Any]:
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
    manifest, lines = _run(dataset, paths, ex, job, actors, batch_size, num_gpus, {**previous, **staged})
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
            batch_size: int = 8, actors: int | None = None, num_gpus: float | None = None, device: str = "auto",
            overwrite: bool = False, filesystem: Any = None) -> dict[str, Any]:
    """Explain ``images`` (a ``ray.data.Dataset`` with a ``path`` column and, optionally, ``bytes``, as
    ``read_binary_files(..., include_paths=True)`` gives; or a list of paths) into ``out``: a local
    folder (the output transaction of ``camframe explain``), or any ``pyarrow`` file system path
    (``s3://...``, or ``filesystem`` given). ``actors`` defaults to the cluster's GPUs, else its CPUs;
    ``num_gpus`` per actor to 1 where the cluster has GPUs. Rerun, it resumes. Returns the manifest."""
    if batch_size < 1:
        raise CamframeError("batch_size must be at least 1")
    connect(None)
    ex = Explainer(_plugins.load_model(model, weights, "cpu"), adapter=adapter, options=options, layers=layers,
                   method=method, aggregate=aggregate, normalise=normalise, guided=guided,
                   method_options=method_options, smooth=smooth)
    ids = None if classes is None else _validate.class_ids([str(c) for c in classes], ex.adapter, ex.model)
    picked = select_boxes(ex.adapter, boxes)
    if isinstance(images, ray.data.Dataset):
        dataset, paths = images, _ordered_paths(images)
    else:
        paths = [str(p) for p in images]
        dataset = ray.data.from_items([{"path": p} for p in paths])
    target = str(out)
    if filesystem is None and "://" not in target:
        with OutputDir(Path(target), overwrite, resumable=True) as o:
            manifest = _into_outputdir(dataset, paths, o, ex, model, weights, ids, picked, save_maps, device, actors,
                                       batch_size, num_gpus)
            _finish(manifest, model, picked)
            o.json("manifest.json", manifest)
        return manifest
    fs, root = (filesystem, target) if filesystem is not None else pafs.FileSystem.from_uri(target)
    store = _Store(fs, root)
    stems = dict(zip(paths, _stems([Path(p) for p in paths]).values()))
    job = _Job(model, weights, _shipped(model, weights), _settings(ex), ids, picked, save_maps, device,
               run_key(ex, model, ids, picked, save_maps), stems, set(), store.root, fs)
    manifest, lines = _run(dataset, paths, ex, job, actors, batch_size, num_gpus, _verified(store, stems, [JOURNAL]))
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
