"""camframe plugin: explain each face that MTCNN (facenet-pytorch) detects.

camframe loads this module through the ``camframe`` entry point on every run, whatever the
model, so it imports nothing heavy: the detector (and facenet-pytorch) only when needed.
"""

from __future__ import annotations

from typing import Any

import camframe

from .adapter import MTCNNAdapter

__version__ = "0.1.0"
__all__ = ["MTCNNAdapter", "load"]


def load(weights: str | None = None, device: str = "cpu") -> Any:
    """An ``MTCNNDetector`` with facenet-pytorch's pretrained weights (shipped with the package),
    or a state dict from ``weights``."""
    import torch

    from .model import MTCNNDetector

    model = MTCNNDetector(pretrained=weights is None)
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval().to(device)


@camframe.hookimpl
def camframe_adapters() -> list[camframe.Adapter]:
    return [MTCNNAdapter()]


@camframe.hookimpl
def camframe_load_model(spec: str, weights: str | None, device: str) -> Any:
    return load(weights, device) if spec == "mtcnn" else None
