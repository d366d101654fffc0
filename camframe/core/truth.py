"""Ground-truth boxes for evaluation: YOLO label files or a COCO JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from camframe.core.errors import CamframeError

__all__ = ["Truth", "TruthSource"]


@dataclass
class Truth:
    """Boxes (xyxy, original pixels) with class ids (None where unknown) and names."""

    boxes: Tensor
    classes: list[int | None]
    names: list[str]


class TruthSource:
    """Finds each image's boxes: ``labels`` is a COCO JSON, a folder of YOLO ``.txt`` files, or
    None (a ``.txt`` beside the image, or in the sibling ``labels/`` folder of an ``images/`` one)."""

    def __init__(self, labels: Path | None, class_names: list[str] | None) -> None:
        self.labels, self.class_names = labels, class_names
        self.coco: dict[str, list[tuple[list[float], str]]] | None = None
        if labels is not None and labels.suffix.lower() == ".json":
            self.coco = _read_coco(labels)
        elif labels is not None and not labels.is_dir():
            raise CamframeError(f"{labels}: labels must be a COCO .json file or a folder of YOLO .txt files")

    def __call__(self, image: Path, size: tuple[int, int]) -> Truth:
        if self.coco is not None:
            rows = self.coco.get(image.name, [])
            boxes = [[x, y, x + w, y + h] for (x, y, w, h), _ in rows]
            names = [n for _, n in rows]
            lookup = {n.lower(): i for i, n in enumerate(self.class_names or [])}
            return Truth(_tensor(boxes), [lookup.get(n.lower()) for n in names], names)
        txt = self._yolo_file(image)
        h, w = size
        boxes, classes = [], []
        for c, (cx, cy, bw, bh) in _read_yolo(txt) if txt is not None else []:
            boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            classes.append(c)
        names = [self.class_names[c] if self.class_names and c < len(self.class_names) else str(c) for c in classes]
        return Truth(_tensor(boxes), list(classes), names)

    def _yolo_file(self, image: Path) -> Path | None:
        candidates = [image.with_suffix(".txt")]
        if self.labels is not None:
            candidates.insert(0, self.labels / f"{image.stem}.txt")
        if image.parent.parent.name == "images" or image.parent.name == "images":
            parts = list(image.parts)
            idx = len(parts) - 1 - parts[::-1].index("images")
            candidates.append(Path(*parts[:idx], "labels", *parts[idx + 1:]).with_suffix(".txt"))
        return next((c for c in candidates if c.is_file()), None)


def _read_yolo(path: Path) -> list[tuple[int, list[float]]]:
    """The ``class cx cy w h`` rows of a YOLO label file (further numbers, e.g. a polygon's, ignored)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CamframeError(f"{path}: not a readable text label file ({type(exc).__name__})") from None
    if "\x00" in text:
        raise CamframeError(f"{path}: not a text label file (binary data)")
    return [_yolo_row(path, number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _yolo_row(path: Path, number: int, line: str) -> tuple[int, list[float]]:
    """One label line: a whole non-negative class id and four finite numbers."""
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        values = []
    if len(values) < 5 or not all(math.isfinite(v) for v in values) or not values[0].is_integer() or values[0] < 0:
        raise CamframeError(f"{path}:{number}: expected 'class cx cy w h' (a class id and 4 numbers), "
                            f"got {line.strip()[:60]!r}")
    return int(values[0]), values[1:5]


def _tensor(boxes: list[list[float]]) -> Tensor:
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def _read_coco(path: Path) -> dict[str, list[tuple[list[float], str]]]:
    try:
        data = json.loads(path.read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        files = {im["id"]: Path(im["file_name"]).name for im in data["images"]}
        out: dict[str, list[tuple[list[float], str]]] = {f: [] for f in files.values()}
        for a in data["annotations"]:
            out[files[a["image_id"]]].append((list(map(float, a["bbox"])), names[a["category_id"]]))
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CamframeError(f"{path}: not a readable COCO annotation file ({type(exc).__name__}: {exc})") from None
