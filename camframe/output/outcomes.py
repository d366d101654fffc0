"""``camframe explain --labels/--box/--contrast``: the request per batch, and what the manifest and files say."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from camframe.adapters.base import Detection, Target
from camframe.core.truth import TruthSource
from camframe.engine.outcomes import Errors, Region, parse_boxes
from camframe.output.folder import class_label

__all__ = ["Request", "annotate", "contrast_part", "file_part", "pictured", "record_fields", "truth_boxes"]


class Request:
    """The ``--labels``, ``--box``, ``--contrast`` and ``--match-iou`` of a run, checked up front; called
    with a batch's paths and images, the keyword arguments ``Explainer.__call__`` takes for them."""

    def __init__(self, ex: Any, labels: str | None, boxes: Sequence[str] | None, contrast: str | None,
                 match_iou: float) -> None:
        self.truth = None if labels is None else TruthSource(Path(labels) if labels else None,
                                                             ex.adapter.class_names(ex.model))
        pairs = parse_boxes(boxes or [])
        checked = Errors.of(ex.adapter, ex.model, None if labels is None else [], [pairs] if pairs else None, contrast,
                            match_iou, ex.black_box)  # checked here, before anything is written
        self.regions: list[Region] | None = checked.regions[0] if checked and checked.regions else None
        self.contrast, self.match_iou = contrast, match_iou
        self.key = repr((labels, [(r.box, r.class_id) for r in self.regions or []], contrast, match_iou))

    def __bool__(self) -> bool:
        return self.truth is not None or self.regions is not None or self.contrast is not None

    def __call__(self, paths: Sequence[Path], images: Sequence[np.ndarray]) -> dict[str, Any]:
        truth = self.truth
        return {"labels": None if truth is None else [truth(p, im.shape[:2]) for p, im in zip(paths, images)],
                "regions": None if self.regions is None else [self.regions] * len(paths),
                "contrast": self.contrast, "match_iou": self.match_iou}


def annotate(entry: dict[str, Any], info: dict[str, Any]) -> None:
    """An image entry with its outcomes: each detection's, the ground truth, missed objects, user boxes."""
    for rec, outcome in zip(entry.get("detections", []), info.get("detections", [])):
        rec.update(outcome)
    entry.update({k: info[k] for k in ("ground_truth", "missed", "user_boxes") if k in info})


def file_part(t: Target) -> str:
    """What a target adds to its files' names: ``.missed0.cat``, ``.user_box1.dog``, ``.box2.cat``, and
    ``.vs-dog`` for a contrast; ``.confusion2...`` for a false positive's contrast with its ground truth."""
    kind, k = t.subject or ("box", t.box)
    return "" if k is None else f".{kind}{k}.{class_label(t.class_id, t.class_name)}"


def contrast_part(t: Target, names: list[str] | None) -> str:
    """``.vs-CLASS`` for a target explained against a contrast class."""
    if t.contrast is None:
        return ""
    return f".vs-{class_label(t.contrast, names[t.contrast] if names else str(t.contrast))}"


def record_fields(t: Target, info: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
    """The explanation's outcome (``tp``/``fp``/``fn``), which missed object or user box, its contrast."""
    rec: dict[str, Any] = {}
    kind, k = t.subject or (None, None)
    if kind in ("missed", "user_box"):  # a candidate is backed where it passes the threshold
        item = info["missed" if kind == "missed" else "user_boxes"][k]
        rec["supported"] = not item.get("why", {}).get("below_threshold", False) and "top_class" not in item.get(
            "why", {})
    if kind == "missed":
        rec.update(outcome="fn", missed_index=k)
    elif kind == "user_box":
        rec["user_box_index"] = k
    elif t.box is not None and t.box < len(info.get("detections", [])):  # a detection's own, or its confusion
        rec["outcome"] = info["detections"][t.box]["outcome"]
    if t.contrast is not None:
        rec.update(contrast_class_id=t.contrast, contrast_class_name=names[t.contrast] if names else str(t.contrast))
    return rec


def pictured(t: Target, info: dict[str, Any]) -> tuple[list[Detection], list[str]]:
    """The boxes drawn on a missed object's or user box's picture besides its candidate: the box itself."""
    kind, k = t.subject or (None, None)
    if kind not in ("missed", "user_box") or k is None:
        return [], []
    item = info["missed" if kind == "missed" else "user_boxes"][k]
    box = item.get("gt_box", item.get("box"))
    cls = item.get("class_id")
    label = "missed " + item.get("class_name", "") if kind == "missed" else "your box"
    return [Detection(tuple(box), cls if cls is not None else 0, label, float("nan"))], [label]


def truth_boxes(info: dict[str, Any]) -> tuple[list[Detection], list[str]]:
    """The ground-truth objects as boxes to draw, labelled ``gt k: class`` (``missed`` where none matched)."""
    missed = {m["gt_index"] for m in info.get("missed", [])}
    boxes, labels = [], []
    for g, obj in enumerate(info.get("ground_truth", [])):
        boxes.append(Detection(tuple(obj["box"]), obj["class_id"] if obj["class_id"] is not None else 0,
                               obj["class_name"], float("nan")))
        labels.append(f"gt {g}: {obj['class_name']}" + (" (missed)" if g in missed else ""))
    return boxes, labels
