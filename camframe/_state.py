"""Put a model in explaining state and give it back exactly as it came."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["explaining"]


@contextmanager
def explaining(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters inside; training flags and ``requires_grad`` restored after."""
    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for m, _ in training:  # not model.eval(): a wrapper may override train() (Ultralytics' starts training)
            m.training = False
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)
