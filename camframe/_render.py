"""Pictures people can look at: heat-map overlays, guided gradients, boxes."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ._adapter import Detection

__all__ = ["overlay", "gradient_image", "draw_boxes"]

_PALETTE = [(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (146, 204, 23), (61, 219, 134),
            (26, 147, 52), (255, 178, 29), (207, 210, 49), (52, 69, 147), (100, 115, 255), (132, 56, 255)]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] map (JET colours) over an RGB uint8 image of the same size."""
    colours = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1 - alpha, colours, alpha, 0)


def gradient_image(gradient: np.ndarray) -> np.ndarray:
    """A ``(C, H, W)`` input gradient as an RGB uint8 picture (zero mean, 0.1 std around grey)."""
    g = gradient.transpose(1, 2, 0).astype(np.float64)
    g = (g - g.mean()) / (g.std() + 1e-5) * 0.1 + 0.5
    g = np.uint8(np.clip(g, 0, 1) * 255)
    return np.repeat(g, 3, axis=2) if g.shape[2] == 1 else np.ascontiguousarray(g[:, :, :3])


def draw_boxes(image: np.ndarray, detections: Sequence[Detection], labels: Sequence[str] | None = None,
               thickness: int | None = None) -> np.ndarray:
    """A copy of ``image`` with each detection's box and label drawn."""
    out = image.copy()
    thickness = thickness or max(1, round(sum(image.shape[:2]) / 600))
    scale = max(0.4, thickness / 3)
    for i, det in enumerate(detections):
        colour = _PALETTE[det.class_id % len(_PALETTE)]
        x1, y1, x2, y2 = (int(round(v)) for v in det.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness, cv2.LINE_AA)
        text = labels[i] if labels is not None else f"{det.class_name} {det.score:.2f}"
        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, thickness // 2))
        top = y1 - h - base - 2 if y1 - h - base - 2 >= 0 else y1
        cv2.rectangle(out, (x1, top), (x1 + w + 2, top + h + base + 2), colour, -1)
        cv2.putText(out, text, (x1 + 1, top + h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(1, thickness // 2), cv2.LINE_AA)
    return out
