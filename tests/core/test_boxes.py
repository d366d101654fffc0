"""IoU of xyxy boxes (camframe.core.boxes) against torchvision's ``box_iou``."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou as reference

from camframe.core.boxes import box_iou, pair_iou


def _boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    corner = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 100
    return torch.cat([corner, corner + torch.rand(n, 2, generator=generator, dtype=torch.float64) * 50], 1)


def test_pairwise_and_single_pair_match_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = _boxes(7, g), _boxes(9, g)
    expected = reference(a, b)
    assert (expected > 0).any() and (expected == 0).any()  # overlapping and disjoint pairs both checked
    torch.testing.assert_close(box_iou(a, b), expected)
    torch.testing.assert_close(box_iou(a.float(), b.float()), expected.float())
    assert pair_iou(a[2].tolist(), b[4].tolist()) == float(box_iou(a[2:3], b[4:5])[0, 0])
    assert abs(pair_iou(a[2].tolist(), b[4].tolist()) - float(expected[2, 4])) < 1e-12


def test_empty_union_is_zero() -> None:
    assert pair_iou((1.0, 1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0)) == 0.0
    assert pair_iou((0.0, 0.0, 2.0, 2.0), (1.0, 1.0, 3.0, 3.0)) == 1 / 7
