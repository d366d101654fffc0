"""The image overview map: one image's box maps stacked by per-pixel ``max``, overall and per class.

Each box's map is already in [0, 1] (normalised after aggregation), so every box shows at full
strength: the superposition of the boxes' own evidence, not one map shared by all boxes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from camframe.adapters.base import Detection, Target
from camframe.core.aggregate import fold_max
from camframe.output.folder import OutputDir, class_label
from camframe.output.render import draw_boxes, overlay

__all__ = ["Overviews"]


class Overviews:
    """Running maxima of one image's box maps as the CLI writes them: over all boxes and, with
    ``per_class``, over each class's boxes. Targets without a box (classifiers) are left out."""

    def __init__(self, per_class: bool) -> None:
        self.per_class = per_class
        self.stacks: dict[tuple[int, str] | None, Tensor] = {}
        self.boxes: dict[tuple[int, str] | None, dict[int, Detection]] = {}

    def add(self, target: Target, heat: np.ndarray) -> None:
        """Fold ``heat`` (the target's map on the original image, in [0, 1]) in."""
        if target.box is None or target.detection is None:
            return
        keys: list[tuple[int, str] | None] = [None]
        if self.per_class:
            keys.append((target.class_id, target.class_name))  # type: ignore[arg-type]
        for key in keys:
            self.stacks[key] = fold_max(self.stacks.get(key), torch.from_numpy(heat))
            self.boxes.setdefault(key, {})[target.box] = target.detection

    def write(self, out: OutputDir, stem: str, image: np.ndarray, save_maps: bool) -> dict[str, Any]:
        """Write ``<stem>.cam.jpg`` (and ``<stem>.<class>.cam.jpg`` per class) with the explained
        boxes drawn; the manifest fields ``overview_map`` and ``class_overview_maps`` (none when no
        box was explained)."""
        entry: dict[str, Any] = {}
        for key, stack in self.stacks.items():
            name = stem if key is None else f"{stem}.{class_label(*key)}"
            boxes = sorted(self.boxes[key].items())
            picture = draw_boxes(overlay(image, stack.numpy()), [d for _, d in boxes],
                                 [f"{k}: {d.class_name} {d.score:.2f}" for k, d in boxes])
            files = {"cam": out.image(f"{name}.cam.jpg", picture)}
            if save_maps:
                files["map"] = out.array(f"{name}.cam.npy", stack.numpy())
            if key is None:
                entry["overview_map"] = {"box_indices": [k for k, _ in boxes], "files": files}
            else:
                entry.setdefault("class_overview_maps", []).append(
                    {"class_id": key[0], "class_name": key[1], "box_indices": [k for k, _ in boxes], "files": files})
        return entry
