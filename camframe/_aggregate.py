"""Upsample, normalise and combine per-layer maps; all in torch, on the maps' device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._errors import CamframeError

__all__ = ["AGGREGATES", "upsample", "normalise", "aggregate"]

AGGREGATES = ("max", "avg")


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(U, h, w)`` maps to ``size`` (half-pixel centres, like cv2)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def normalise(maps: Tensor) -> Tensor:
    """Min-max scale each map to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    low = flat.min(1).values[:, None, None]
    span = flat.max(1).values[:, None, None] - low
    return torch.where(span > 1e-12, (maps - low) / span.clamp(min=1e-12), torch.zeros_like(maps))


def aggregate(maps: Tensor, reached: Tensor, how: str) -> Tensor:
    """Combine normalised maps ``(L, U, H, W)`` over layers; layers a target did not reach
    (``reached`` is ``(L, U)`` bool) take no part. The result is normalised again."""
    if how not in AGGREGATES:
        raise CamframeError(f"unknown aggregate {how!r}; choose one of {', '.join(AGGREGATES)}")
    mask = reached[:, :, None, None].to(maps.dtype)
    if how == "max":
        combined = (maps * mask).amax(0)
    else:
        combined = (maps * mask).sum(0) / mask.sum(0).clamp(min=1)
    return normalise(combined)
