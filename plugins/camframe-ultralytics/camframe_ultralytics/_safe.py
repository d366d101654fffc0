"""Ultralytics checkpoints read by torch's weights-only unpickler: nothing in the file runs but the rebuilding
of allow-listed classes (torch and Ultralytics ``nn.Module`` classes, a few data types), allowed for that load only.
"""

from __future__ import annotations

import enum
import importlib
import pathlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from camframe import CamframeError

MODULE_PACKAGES = ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks")  # their nn.Module classes
CLASS_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal")  # classes defined there (a training's losses)
METHODS = {"forward", "forward_fuse"}  # a fused module's ``forward`` is pickled as getattr(module, name)
FLAG = "--unsafe-load"


def _getattr(obj: Any, name: str) -> Any:
    """``getattr`` as a checkpoint may call it: an enum's member or a module's ``forward``, nothing else."""
    if isinstance(obj, type) and issubclass(obj, enum.Enum) and name in obj.__members__:
        return obj[name]
    if isinstance(obj, nn.Module) and name in METHODS:
        return getattr(type(obj), name).__get__(obj)
    if isinstance(obj, type) and issubclass(obj, nn.Module) and name in METHODS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not allowed")


def _data() -> dict[str, Any]:
    """Allowed globals by name that are not model classes: data types, and names older versions pickled."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace
    from ultralytics.utils.loss import E2EDetectLoss

    scalar = np.float64(0).__reduce__()[0]
    here = type(pathlib.Path())
    return {"numpy.dtype": np.dtype, "numpy.core.multiarray.scalar": scalar, "numpy._core.multiarray.scalar": scalar,
            "ultralytics.utils.IterableSimpleNamespace": IterableSimpleNamespace,
            "ultralytics.yolo.utils.IterableSimpleNamespace": IterableSimpleNamespace,
            "ultralytics.nn.modules.block.Silence": nn.Identity,  # YOLOv9e
            "ultralytics.nn.tasks.YOLOv10DetectionModel": DetectionModel,
            "ultralytics.utils.loss.v10DetectLoss": E2EDetectLoss,
            "builtins.getattr": _getattr,
            **{f"{m}.{c}": here for m in ("pathlib", "pathlib._local") for c in ("PosixPath", "WindowsPath")}}


def _allowed(name: str, data: dict[str, Any]) -> Any | None:
    """What the checkpoint's global ``name`` is rebuilt as, or None where it is not allowed."""
    if name in data:
        return data[name]
    module, _, attr = name.rpartition(".")
    within = any(module == p or module.startswith(p + ".") for p in MODULE_PACKAGES)
    if not (within or module in CLASS_MODULES):
        return None
    try:
        obj = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    if not isinstance(obj, type):
        return None
    return obj if (obj.__module__ == module if module in CLASS_MODULES else issubclass(obj, nn.Module)) else None


def safe_load(path: Path, spec: str) -> dict[str, Any]:
    """The checkpoint dict in ``path`` read with ``weights_only=True``, the globals it names allowed for this
    load only; a one-line error naming ``--unsafe-load`` where it names anything else."""
    refuse = f"{spec}: refused to load: %s; if you trust this file, pass {FLAG} (it then runs the code it holds)"
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # torch < 2.6
        raise CamframeError(refuse % f"checking a checkpoint needs torch >= 2.6 (this is {torch.__version__})")
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a torch.save() archive (a legacy pickle, or no checkpoint at all): the unpickler decides
        needed = []
    data = _data()
    found = {name: _allowed(name, data) for name in needed}
    refused = sorted(name for name, obj in found.items() if obj is None)
    if refused:
        shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise CamframeError(refuse % f"it names {shown}, outside the Ultralytics model classes camframe allows")
    entries = [(obj, name) for name, obj in found.items()]
    if "numpy.dtype" in found:  # numpy's dtype classes are rebuilt by name, absent from the scan
        entries += [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    try:
        with torch.serialization.safe_globals(entries):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = str(exc).split("Unsupported global:")[-1].strip().splitlines()[0] if str(exc) else type(exc).__name__
        raise CamframeError(refuse % f"torch's weights-only unpickler refused it ({why})") from None


def model_of(ckpt: Any, path: Path, spec: str) -> nn.Module:
    """The float32 eval-mode model of a checkpoint dict, set up as Ultralytics' ``load_checkpoint`` sets it up."""
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.nn.tasks import guess_model_task

    candidate = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(candidate, nn.Module):
        raise CamframeError(f"{spec}: not an Ultralytics checkpoint (no model in it)")
    train_args = ckpt.get("train_args") or {}
    model = candidate.float()
    model.args = {**DEFAULT_CFG_DICT, **(train_args if isinstance(train_args, dict) else vars(train_args))}
    model.pt_path = str(path)
    model.task = getattr(model, "task", guess_model_task(model))
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = True
        elif isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    return model.eval()
