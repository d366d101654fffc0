"""Pictures people can look at: heat-map overlays, guided gradients, boxes."""

from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from ._adapter import Detection

__all__ = ["overlay", "gradient_image", "draw_boxes"]

_PALETTE = [(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (146, 204, 23), (61, 219, 134),
            (26, 147, 52), (255, 178, 29), (207, 210, 49), (52, 69, 147), (100, 115, 255), (132, 56, 255)]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] map (JET colours) over an RGB uint8 image of the same size."""
    colours = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1 - alpha, colours, alpha, 0)


def gradient_image(gradient: Tensor | np.ndarray, resize: Callable[[Tensor], Tensor] | None = None,
                   inplace: bool = False) -> np.ndarray:
    """A ``(C, h, w)`` input gradient as an RGB uint8 picture (zero mean, 0.1 std around grey).

    ``resize`` (``(C, h, w)`` -> ``(C, H, W)``, e.g. onto the original image) is applied first; the
    picture is then worked out in place, in float32, so memory peaks at one float32 picture of the
    final size (plus the uint8 result). ``inplace``: a float32 ``gradient`` the caller no longer needs
    is worked on as it is (not copied).
    """
    source = torch.as_tensor(gradient).detach()
    g = source.to(torch.float32)
    if resize is not None:
        g = resize(g)
    if not inplace and g.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        g = g.clone()  # the steps below work in place, never on the caller's tensor
    mean = g.mean()  # two passes: 15x faster than torch.std_mean's single-threaded Welford pass
    g.sub_(mean)
    std = float(torch.linalg.vector_norm(g)) / g.numel() ** 0.5
    g.mul_(25.5 / (std + 1e-5)).add_(127.5).clamp_(0, 255)  # 255 · (0.5 + 0.1 · g / std), in [0, 255]
    planes = g.cpu().numpy()
    picture = np.empty((*planes.shape[1:], 3), np.uint8)
    for c in range(3):  # numpy's casting copy truncates, as np.uint8, 3x faster than torch's permuted one
        picture[..., c] = planes[min(c, len(planes) - 1)]
    return picture


def draw_boxes(image: np.ndarray, detections: Sequence[Detection], labels: Sequence[str] | None = None,
               thickness: int | None = None) -> np.ndarray:
    """A copy of ``image`` with each detection's box and label drawn."""
    out = image.copy()
    thickness = thickness or max(1, round(sum(image.shape[:2]) / 600))
    scale = max(0.4, thickness / 3)
    for i, det in enumerate(detections):
        colour = _PALETTE[det.class_id % len(_PALETTE)]
        x1, y1, x2, y2 = (int(round(v)) for v in det.box)
        if "polygon" in det.extra:  # a rotated box: its 4 corners in original pixels
            cv2.polylines(out, [np.round(det.extra["polygon"]).astype(np.int32)], True, colour, thickness, cv2.LINE_AA)
        else:
            cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness, cv2.LINE_AA)
        text = labels[i] if labels is not None else f"{det.class_name} {det.score:.2f}"
        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, thickness // 2))
        top = y1 - h - base - 2 if y1 - h - base - 2 >= 0 else y1
        cv2.rectangle(out, (x1, top), (x1 + w + 2, top + h + base + 2), colour, -1)
        cv2.putText(out, text, (x1 + 1, top + h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(1, thickness // 2), cv2.LINE_AA)
    return out
