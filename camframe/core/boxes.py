"""Intersection over union of xyxy boxes: pairwise on tensors, or of one pair."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["box_iou", "pair_iou"]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU ``(T, D)`` of xyxy boxes ``a`` ``(T, 4)`` and ``b`` ``(D, 4)``; 0 where the union is empty."""
    wh = (torch.minimum(a[:, None, 2:], b[None, :, 2:]) - torch.maximum(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def pair_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """The IoU of two xyxy boxes, computed in float64 by ``box_iou``."""
    pair = torch.tensor([list(a), list(b)], dtype=torch.float64)
    return float(box_iou(pair[:1], pair[1:])[0, 0])
