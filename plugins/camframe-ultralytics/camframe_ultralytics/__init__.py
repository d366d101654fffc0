"""camframe plugin: Ultralytics YOLO detectors (boxes, masks, keypoints, rotated boxes), RT-DETR and classify models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import camframe

from ._load import import_quietly, load

import_quietly()  # before anything imports Ultralytics: its first-run banner must not reach stdout

from ._adapter import YOLOAdapter  # noqa: E402
from ._classify import YOLOClassifyAdapter  # noqa: E402
from ._rtdetr import RTDETRAdapter  # noqa: E402

__version__ = "0.1.0"
__all__ = ["RTDETRAdapter", "YOLOAdapter", "YOLOClassifyAdapter", "load"]


@camframe.hookimpl
def camframe_adapters() -> list[camframe.Adapter]:
    return [YOLOAdapter(), YOLOClassifyAdapter(), RTDETRAdapter()]


@camframe.hookimpl
def camframe_load_model(spec: str, weights: str | None, device: str, unsafe_load: bool) -> Any:
    if Path(spec).suffix.lower() not in {".pt", ".yaml", ".yml"}:
        return None
    if weights:
        raise camframe.CamframeError("a YOLO checkpoint is the model itself: "
                                     "pass it as --model FILE.pt, without --weights")
    return load(spec, device, unsafe=unsafe_load)
