"""Weighting methods: turn a layer's activations and gradients into one map per target.

Each method takes activations ``A`` and gradients ``G`` of shape ``(U, C, h, w)`` (one row per
target; ``G`` is None for gradient-free methods) and returns ``(U, h, w)``. The engine clamps the
result at zero afterwards, as every method below defines its map as ReLU of a weighted sum.
A black-box method (``black_box = True``, e.g. ``drise`` in ``_drise.py``) is called on the model
and its input instead; ``method_options`` checks its options.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from camframe.core.errors import CamframeError

__all__ = ["Method", "method", "method_options", "BUILTIN_METHODS", "ALIASES"]


class Method(Protocol):
    needs_gradients: bool

    def __call__(self, activations: Tensor, gradients: Tensor | None) -> Tensor: ...


def method_options(method: Any, name: str, adapter: Any, options: dict[str, Any] | None) -> dict[str, Any]:
    """A black-box method's options (``black_box = True``, e.g. ``drise``), checked by its
    ``configure(adapter, **options)``; other methods take none."""
    if getattr(method, "black_box", False):
        return method.configure(adapter, **(options or {}))
    if options:
        raise CamframeError(f"method {name!r} takes no method options ({', '.join(options)}); "
                            "they apply to black-box methods such as drise")
    return {}


def method(*, gradients: bool = True, local: bool = False) -> Callable[[Callable[..., Tensor]], Method]:
    """Mark a function as a weighting method; ``gradients=False`` for gradient-free ones; ``local``: its
    map at a pixel depends on that pixel's activations and gradients alone, and is zero where they are."""

    def mark(fn: Callable[..., Tensor]) -> Method:
        fn.needs_gradients = gradients  # type: ignore[attr-defined]
        fn.local = local  # type: ignore[attr-defined]
        return fn  # type: ignore[return-value]

    return mark


def _weighted(activations: Tensor, weights: Tensor) -> Tensor:
    return (weights[:, :, None, None] * activations).sum(1)


@method(local=True)
def elementwise(activations: Tensor, gradients: Tensor) -> Tensor:
    """HiResCAM: ``ReLU(sum_c G * A)``."""
    return (gradients * activations).sum(1)


@method(local=True)
def elementwise_relu(activations: Tensor, gradients: Tensor) -> Tensor:
    """Element-wise Grad-CAM: ``sum_c ReLU(G * A)``."""
    return (gradients * activations).clamp(min=0).sum(1)


@method()
def gradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM: channel weights are the spatial mean of the gradients."""
    return _weighted(activations, gradients.mean((2, 3)))


@method()
def gradcam_plus_plus(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018), closed form for an exponential score."""
    g2 = gradients.pow(2)
    g3 = g2 * gradients
    sum_a = activations.sum((2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    return _weighted(activations, (gradients.clamp(min=0) * alpha).sum((2, 3)))


@method()
def xgradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al. 2020): gradients weighted by normalised activations."""
    sum_a = activations.sum((2, 3), keepdim=True)
    return _weighted(activations, (gradients * activations / (sum_a + 1e-7)).sum((2, 3)))


@method(local=True)
def layercam(activations: Tensor, gradients: Tensor) -> Tensor:
    """LayerCAM (Jiang et al. 2021): ``sum_c ReLU(G) * A``."""
    return (gradients.clamp(min=0) * activations).sum(1)


@method(gradients=False)
def eigencam(activations: Tensor, gradients: None = None) -> Tensor:
    """Eigen-CAM: projection on the first principal component; sign chosen to match the mean."""
    u, c, h, w = activations.shape
    flat = torch.nan_to_num(activations.float().reshape(u, c, h * w).transpose(1, 2))
    flat = flat - flat.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    projection = flat @ vh[:, 0, :, None]
    sign = torch.sign((projection.squeeze(2) * flat.mean(2)).sum(1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (projection.squeeze(2) * sign[:, None]).reshape(u, h, w)


BUILTIN_METHODS: dict[str, Method] = {
    "elementwise": elementwise,
    "elementwise-relu": elementwise_relu,
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "eigencam": eigencam,
}

ALIASES: dict[str, str] = {"hirescam": "elementwise"}
