"""camframe: class activation maps for PyTorch vision models, box by box and class by class."""

from __future__ import annotations

__version__ = "0.1.0"

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
