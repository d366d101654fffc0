"""``manifest.json``, schema version 1: the records it is built from and its JSON Schema (docs/manifest.md)."""

from __future__ import annotations

import json
import math
import platform
from functools import lru_cache
from importlib import metadata, resources
from typing import Any

import numpy as np
import torch

from camframe import __version__
from camframe.adapters.base import Adapter, Detection, Target

__all__ = ["SCHEMA", "manifest_schema", "head", "size", "detection_record", "explanation_record", "caption"]

SCHEMA = "camframe-manifest/1"
_GEOMETRY = ("polygon", "keypoints", "mask")  # ``Detection.extra`` keys in original pixels, kept as they are


@lru_cache(maxsize=None)
def _schema_text() -> str:
    return resources.files("camframe").joinpath("schemas", "manifest-1.json").read_text(encoding="utf-8")


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the ``manifest.json`` that ``camframe explain`` writes (a new dict)."""
    return json.loads(_schema_text())


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def head(adapter: Adapter, device: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """What a manifest says of the run before its images: ``settings`` (adapter, method, layers...), the
    adapter's ``fidelity`` note where it has one, the type of device the maps were computed on (``cpu``,
    ``cuda``...) and the versions used."""
    fidelity = {"fidelity": adapter.fidelity} if adapter.fidelity else {}
    return {"schema": SCHEMA, **settings, **fidelity, "device": torch.device(device).type,
            "versions": {"camframe": __version__, "python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": _version("torchvision")}}


def size(image: np.ndarray) -> dict[str, int]:
    """An image's size, named."""
    return {"width": int(image.shape[1]), "height": int(image.shape[0])}


def _score(value: float) -> float | None:
    """A score rounded for the manifest; None where it is not a number (JSON has no NaN)."""
    return round(value, 5) if math.isfinite(value) else None


def detection_record(d: Detection) -> dict[str, Any]:
    """One detection: its box (xyxy, original pixels), class, confidence, and the geometry the adapter
    gave in original pixels (``polygon``, ``rotated_box``, ``keypoints``, ``mask``); the rest of
    ``Detection.extra`` under ``adapter_extra`` (adapter-specific, its own frames)."""
    rec: dict[str, Any] = {"box": [round(v, 2) for v in d.box], "class_id": d.class_id, "class_name": d.class_name,
                           "detection_score": _score(d.score)}
    if d.index is not None:
        rec["model_index"] = d.index
    extra = dict(d.extra)
    if "xywhr" in extra:
        cx, cy, w, h, angle = extra.pop("xywhr")
        rec["rotated_box"] = {"cx": cx, "cy": cy, "width": w, "height": h, "angle": angle}
    rec.update({k: extra.pop(k) for k in _GEOMETRY if k in extra})
    if extra:
        rec["adapter_extra"] = extra
    return rec


def explanation_record(adapter: Adapter, t: Target) -> dict[str, Any]:
    """What an explanation's target is: class, target score and its kind, whether the model backs it;
    for a box, its index in ``detections`` and its detection score. (Method and files: the caller's.)"""
    rec: dict[str, Any] = {"class_id": t.class_id, "class_name": t.class_name, "target_score": _score(t.score),
                           "target_score_kind": adapter.score_kind(t), "supported": adapter.supported(t)}
    if t.box is not None:
        rec["box_index"] = t.box
        if t.detection is not None:
            rec["detection_score"] = _score(t.detection.score)
    return rec


def caption(t: Target, kind: str, supported: bool | None) -> str:
    """A per-target picture's caption: the explained class, its target score and kind, a mark where the
    model does not back it, and the box's own detection."""
    score = f"{t.score:.2f}" if math.isfinite(t.score) else "n/a"
    text = f"{t.class_name} {score} {kind}" + (", not supported" if supported is False else "")
    if t.box is not None and t.detection is not None:
        text += f" | box {t.box}: {t.detection.class_name} {t.detection.score:.2f}"
    return text
