"""camframe plugin: Hugging Face transformers' DETR-family detectors (``detr``), and ``hf:PATH``
loading. transformers is imported only when a model needs it."""

from __future__ import annotations

from typing import Any

import camframe

from .detr import HFDetrAdapter, set_processor

__version__ = "0.1.0"
__all__ = ["HFDetrAdapter", "load", "set_processor"]


def load(path: str, device: str = "cpu") -> Any:
    """A DETR-family detector saved by ``save_pretrained`` (a folder or a Hub id), with the image
    processor saved beside it, if any, for its preprocessing."""
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    try:
        model = AutoModelForObjectDetection.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise camframe.CamframeError(f"cannot load hf:{path}: {str(exc).splitlines()[0]}") from None
    try:
        set_processor(model, AutoImageProcessor.from_pretrained(path))
    except (OSError, ValueError):  # no preprocessor_config.json: the family's default processor
        pass
    return model.to(device)


@camframe.hookimpl
def camframe_adapters() -> list[camframe.Adapter]:
    return [HFDetrAdapter()]


@camframe.hookimpl
def camframe_load_model(spec: str, weights: str | None, device: str) -> Any:
    """``hf:PATH``: a transformers checkpoint folder (or Hub id); it carries its own weights."""
    if not spec.startswith("hf:"):
        return None
    if weights is not None:
        raise camframe.CamframeError("an hf: checkpoint carries its own weights; drop --weights")
    return load(spec[3:], device)
