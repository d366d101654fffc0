"""Pictures people can look at: heat-map overlays, guided gradients, boxes."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from camframe.adapters.base import Detection

__all__ = ["overlay", "gradient_image", "draw_boxes", "draw_detections"]

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
    thickness = thickness or _thickness(image)
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
        left = max(0, min(x1, out.shape[1] - w - 2))  # a long label is moved left to stay in the picture
        cv2.rectangle(out, (left, top), (left + w + 2, top + h + base + 2), colour, -1)
        cv2.putText(out, text, (left + 1, top + h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(1, thickness // 2), cv2.LINE_AA)
    return out


def _thickness(image: np.ndarray) -> int:
    return max(1, round(sum(image.shape[:2]) / 600))


def draw_detections(image: np.ndarray, detections: Sequence[Detection], labels: Sequence[str] | None = None,
                    skeleton: Sequence[tuple[int, int]] = (), keypoint_conf: float = 0.25) -> np.ndarray:
    """``draw_boxes`` with what ``Detection.extra`` holds in original pixels drawn too, as Ultralytics'
    ``plot()`` draws it: ``mask`` polygons filled at half opacity in the box's colour (under the boxes),
    ``polygon`` as the rotated box, ``keypoints`` as dots (those whose visibility is below
    ``keypoint_conf`` left out) joined by the ``skeleton``'s lines."""
    out = image.copy()
    for det in detections:
        if det.extra.get("mask"):
            _fill(out, det.extra["mask"], _PALETTE[det.class_id % len(_PALETTE)])
    out = draw_boxes(out, detections, labels)
    radius = _thickness(image) + 2
    for det in detections:
        if det.extra.get("keypoints"):
            _keypoints(out, det.extra["keypoints"], skeleton, _PALETTE[det.class_id % len(_PALETTE)], radius,
                       keypoint_conf)
    return out


def _fill(out: np.ndarray, polygons: Sequence[Any], colour: tuple[int, int, int], alpha: float = 0.5) -> None:
    """Blend ``colour`` into ``out`` (in place) inside ``polygons`` (each ``[[x, y], ...]``, original pixels)."""
    inside = np.zeros(out.shape[:2], np.uint8)
    cv2.fillPoly(inside, [np.round(np.asarray(p, np.float64)).astype(np.int32).reshape(-1, 2) for p in polygons
                          if len(p) >= 3], 1)
    region = inside.astype(bool)
    out[region] = (out[region] * (1 - alpha) + np.array(colour) * alpha).round().astype(np.uint8)


def _keypoints(out: np.ndarray, points: Sequence[Sequence[float]], skeleton: Sequence[tuple[int, int]],
               colour: tuple[int, int, int], radius: int, conf: float) -> None:
    """Dots at ``points`` (``[x, y]`` or ``[x, y, visibility]``) and the ``skeleton``'s lines between shown ones."""
    shown = [len(p) < 3 or p[2] >= conf for p in points]
    xy = [(int(round(p[0])), int(round(p[1]))) for p in points]
    for k, (point, visible) in enumerate(zip(xy, shown)):
        if visible:
            cv2.circle(out, point, radius, _PALETTE[k % len(_PALETTE)], -1, cv2.LINE_AA)
    for a, b in skeleton:  # over the dots, as Ultralytics draws them
        if a < len(xy) and b < len(xy) and shown[a] and shown[b]:
            cv2.line(out, xy[a], xy[b], colour, max(1, radius // 2), cv2.LINE_AA)
