"""camframe: class activation maps for PyTorch vision models, box by box and class by class.

The public names are imported on first use (PEP 562): ``import camframe`` alone imports no torch, so that
the ``camframe`` command is interruptible from its first instant (``camframe._entry``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_FROM = {"Adapter": "_adapter", "ClassifierAdapter": "_adapter", "Detection": "_adapter", "Target": "_adapter",
         "Boxes": "_detector", "DetectorAdapter": "_detector", "CamframeError": "_errors",
         "Explainer": "_explainer", "Result": "_explainer", "hookimpl": "_hookspecs", "MAX_PIXELS": "_images",
         "load_image": "_images", "pixel_limit": "_images", "method": "_methods", "load_model": "_plugins",
         "manifest_schema": "_manifest"}

if TYPE_CHECKING:
    from ._adapter import Adapter, ClassifierAdapter, Detection, Target
    from ._detector import Boxes, DetectorAdapter
    from ._errors import CamframeError
    from ._explainer import Explainer, Result
    from ._hookspecs import hookimpl
    from ._images import MAX_PIXELS, load_image, pixel_limit
    from ._manifest import manifest_schema
    from ._methods import method
    from ._plugins import load_model

__all__ = [
    "Adapter",
    "Boxes",
    "CamframeError",
    "ClassifierAdapter",
    "Detection",
    "DetectorAdapter",
    "Explainer",
    "MAX_PIXELS",
    "Result",
    "Target",
    "hookimpl",
    "load_image",
    "load_model",
    "manifest_schema",
    "method",
    "pixel_limit",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module at first use."""
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM})
