"""camframe: class activation maps for PyTorch vision models, box by box and class by class.

The public names are imported on first use (PEP 562): ``import camframe`` alone imports no torch, so that
the ``camframe`` command is interruptible from its first instant (``camframe._entry``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_FROM = {"Adapter": "adapters.base", "ClassifierAdapter": "adapters.base", "Detection": "adapters.base",
         "Target": "adapters.base", "Boxes": "adapters.detector", "DetectorAdapter": "adapters.detector",
         "CamframeError": "core.errors", "Explainer": "engine.explainer", "Result": "engine.explainer",
         "hookimpl": "plugins.hookspecs", "MAX_PIXELS": "core.images", "load_image": "core.images",
         "pixel_limit": "core.images", "method": "methods.weightings", "load_model": "plugins.manager",
         "manifest_schema": "output.manifest", "write": "output.writer"}

if TYPE_CHECKING:
    from camframe.adapters.base import Adapter, ClassifierAdapter, Detection, Target
    from camframe.adapters.detector import Boxes, DetectorAdapter
    from camframe.core.errors import CamframeError
    from camframe.engine.explainer import Explainer, Result
    from camframe.plugins.hookspecs import hookimpl
    from camframe.core.images import MAX_PIXELS, load_image, pixel_limit
    from camframe.output.manifest import manifest_schema
    from camframe.methods.weightings import method
    from camframe.plugins.manager import load_model
    from camframe.output.writer import write

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
    "write",
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
