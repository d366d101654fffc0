"""Load YOLO checkpoints and yamls offline, with one-line errors."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from camframe import CamframeError


def import_quietly() -> None:
    """Import Ultralytics without its import-time side effects: what it prints (the settings banner
    of a first run) goes to stderr, and so does its logger (stdout carries camframe's results), and
    PIL's ``Image.open`` is given back (Ultralytics replaces it with one that pip-installs a HEIF
    plugin when a file is not an image)."""
    if "ultralytics" in sys.modules:
        return
    from PIL import Image

    image_open = Image.open
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import ultralytics.utils  # noqa: F401  (creates the settings file and the logger)
    finally:
        Image.open = image_open


def load(spec: str, device: str = "cpu", unsafe: bool = False) -> Any:
    """An Ultralytics model (detect, seg, pose, OBB, RT-DETR, classify) from a local ``.pt`` checkpoint or a
    model ``.yaml``. A checkpoint is read by torch's weights-only unpickler with the Ultralytics model classes
    allowed (``_safe``); ``unsafe``: by Ultralytics' own loader, a full unpickling that runs what the file holds."""
    path = Path(spec)
    if path.suffix.lower() == ".pt":
        if not path.is_file():
            raise CamframeError(f"{spec}: no such checkpoint; Ultralytics would download it, "
                                "which camframe does not do: pass a local .pt file or a model .yaml")
        from ultralytics.nn.tasks import load_checkpoint

        from ._safe import model_of, safe_load

        try:
            model = load_checkpoint(str(path), device="cpu", fuse=False)[0] if unsafe else \
                model_of(safe_load(path, spec), path, spec)
        except CamframeError:
            raise
        except Exception as exc:
            message = f"{spec}: cannot load checkpoint ({type(exc).__name__}: {exc})"
            raise CamframeError(message.splitlines()[0]) from None
        return model.to(device)
    from ultralytics import RTDETR, YOLO

    try:
        if path.stem.lower().startswith("rtdetr"):  # YOLO() cannot build these
            return RTDETR(spec).model.to(device)
        return YOLO(spec, verbose=False).model.to(device)
    except (FileNotFoundError, KeyError, ValueError, TypeError, NotImplementedError) as exc:
        raise CamframeError(f"{spec}: cannot build model from yaml ({exc})".splitlines()[0]) from None
