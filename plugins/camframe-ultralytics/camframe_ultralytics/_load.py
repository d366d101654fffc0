"""Load YOLO checkpoints and yamls offline, with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from camframe import CamframeError


def load(spec: str, device: str = "cpu") -> Any:
    """A ``DetectionModel`` (or subclass) from a local ``.pt`` checkpoint or a model ``.yaml``."""
    path = Path(spec)
    if path.suffix.lower() == ".pt":
        if not path.is_file():
            raise CamframeError(f"{spec}: no such checkpoint; Ultralytics would download it, "
                                "which camframe does not do: pass a local .pt file or a model .yaml")
        from ultralytics.nn.tasks import load_checkpoint

        try:
            model, _ = load_checkpoint(str(path), device="cpu", fuse=False)
        except Exception as exc:
            message = f"{spec}: cannot load checkpoint ({type(exc).__name__}: {exc})"
            raise CamframeError(message.splitlines()[0]) from None
        return model.to(device)
    from ultralytics import YOLO

    try:
        return YOLO(spec, verbose=False).model.to(device)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise CamframeError(f"{spec}: cannot build model from yaml ({exc})".splitlines()[0]) from None
