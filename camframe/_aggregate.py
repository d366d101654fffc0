"""Upsample, normalise and combine per-layer maps; all in torch, on the maps' device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AGGREGATES", "upsample", "normalise", "aggregate"]

AGGREGATES = ("max", "avg")


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(..., h, w)`` maps to ``size`` (half-pixel centres, like cv2)."""
    size = tuple(size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*maps.shape[:-2], *size)


def normalise(maps: Tensor, inplace: bool = False) -> Tensor:
    """Min-max scale each map to [0, 1]; a constant map becomes all zeros."""
    low, high = torch.aminmax(maps.flatten(1), dim=1)
    span = high - low
    scale = torch.where(span > 1e-12, 1 / span.clamp(min=1e-12), torch.zeros_like(span))
    out = maps.sub_(low[:, None, None]) if inplace else maps - low[:, None, None]
    return out.mul_(scale[:, None, None])


def aggregate(maps: dict[str, Tensor], reached: dict[str, Tensor], size: tuple[int, int], how: str) -> Tensor:
    """Normalise each layer's ``(U, h, w)`` map at its own resolution, upsample it to ``size``, and
    combine over layers by ``max`` or ``avg``; a layer that a target did not reach (``reached[name]``
    is False) takes no part. The result is normalised again. Layers are folded in one by one, so
    memory stays at two full-size stacks. ``how`` was checked against ``AGGREGATES`` by the caller."""
    combined: Tensor | None = None
    count: Tensor | None = None
    for name, low in maps.items():
        mask = reached[name].to(low.dtype)[:, None, None]
        layer = upsample(normalise(low).mul_(mask), size)
        if combined is None:
            combined, count = layer, mask.clone()
        elif how == "max":
            torch.maximum(combined, layer, out=combined)
        else:
            combined.add_(layer)
            count.add_(mask)  # type: ignore[union-attr]
    assert combined is not None and count is not None
    if how == "avg":
        combined.div_(count.clamp(min=1))
    return normalise(combined, inplace=True)
