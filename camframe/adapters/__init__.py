"""The adapter kit: everything a plugin needs to teach camframe a new model family, from public names.

An adapter subclasses ``Adapter`` (or ``ClassifierAdapter`` / ``DetectorAdapter``) and a plugin returns it
from its ``camframe_adapters`` hook (``camframe.hookimpl``); see docs/writing-an-adapter.md.

- ``Adapter``, ``ClassifierAdapter``, ``DetectorAdapter``: the base classes.
- ``Detection``, ``Target``, ``Boxes``: what ``detect`` returns, what is explained, which boxes.
- ``Rect``: a rectangle of a layer's map, rows ``y0..y1`` and columns ``x0..x1`` (``Adapter.footprint``).
- ``explaining``: the state guard (eval mode, frozen parameters inside; the model restored after).
- ``load_weights``, ``load_state_dict``: safe loading of a ``--weights`` file into a model.
- ``probe``: every submodule's output shape on an example input (``camframe layers``).
- ``upsample``: bilinear resize of maps (half-pixel centres, like cv2); ``IMAGENET_MEAN``, ``IMAGENET_STD``.
"""

from __future__ import annotations

from camframe.adapters.base import (IMAGENET_MEAN, IMAGENET_STD, Adapter, ClassifierAdapter, Detection, Rect, Target,
                                    probe)
from camframe.adapters.detector import Boxes, DetectorAdapter
from camframe.adapters.state import explaining
from camframe.adapters.weights import load_state_dict, load_weights
from camframe.core.aggregate import upsample
from camframe.core.errors import CamframeError

__all__ = ["Adapter", "ClassifierAdapter", "DetectorAdapter", "Detection", "Target", "Rect", "Boxes", "explaining",
           "load_weights", "load_state_dict", "probe", "upsample", "IMAGENET_MEAN", "IMAGENET_STD", "CamframeError"]
