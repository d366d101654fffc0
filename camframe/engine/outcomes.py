"""What the detector got right and wrong against ground truth, and targets for boxes it did not detect.

``match`` marks each detection ``tp`` or ``fp`` (greedy by score, as COCO: each detection, best first,
takes the unmatched ground-truth object of its class it overlaps most, at IoU >= the threshold); every
ground-truth object left unmatched is missed (``fn``). A missed object, or a box the user names
(``Region``), is explained through the model's best candidate for it (``DetectorAdapter.candidate``):
its own pre-threshold prediction there, a ``Target`` like any detection's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from camframe.adapters.base import Adapter, Detection, Target
from camframe.core.boxes import pair_iou
from camframe.core.errors import CamframeError
from camframe.core.truth import Truth

__all__ = ["Errors", "Region", "match", "parse_boxes", "plan", "region_record"]

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """A box to explain (xyxy, original pixels) and its class (None: the candidate's best class)."""

    box: Box
    class_id: int | None = None


def parse_boxes(items: Sequence[str]) -> list[tuple[Box, str | None]]:
    """``--box`` values: ``x1,y1,x2,y2[:class]``, or a file of such lines (``#`` comments)."""
    out = []
    for item in items:
        path = Path(item)
        lines = path.read_text().splitlines() if path.is_file() else [item]
        for line in lines:
            line = line.split("#")[0].strip()
            if line:
                out.append(_box(line))
    return out


def _box(text: str) -> tuple[Box, str | None]:
    coords, _, cls = text.partition(":")
    try:
        x1, y1, x2, y2 = (float(v) for v in coords.split(","))
    except ValueError:
        raise CamframeError(f"--box {text!r}: expected x1,y1,x2,y2[:class] in original pixels") from None
    if not all(map(math.isfinite, (x1, y1, x2, y2))) or x2 <= x1 or y2 <= y1:
        raise CamframeError(f"--box {text!r}: expected finite x1 < x2 and y1 < y2")
    return (x1, y1, x2, y2), cls.strip() or None


def match(detections: Sequence[Detection], truth: Truth, threshold: float = 0.5
          ) -> tuple[list[dict[str, Any]], list[int]]:
    """Per detection (best first) its outcome record; and the indices of the missed ground-truth objects.

    ``tp``: ``gt_index``, ``gt_iou``; ``fp``: ``confused_with`` where it overlaps (IoU >= ``threshold``) a
    ground-truth object of another class, the one it overlaps most."""
    boxes = [tuple(b) for b in truth.boxes.tolist()]
    taken: set[int] = set()
    records = []
    for d in sorted(range(len(detections)), key=lambda k: -detections[k].score):
        det = detections[d]
        ious = [pair_iou(det.box, b) for b in boxes]
        free = [g for g in range(len(boxes)) if g not in taken and truth.classes[g] == det.class_id
                and ious[g] >= threshold]
        if free:
            g = max(free, key=lambda g: ious[g])
            taken.add(g)
            records.append((d, {"outcome": "tp", "gt_index": g, "gt_iou": round(ious[g], 4)}))
            continue
        rec: dict[str, Any] = {"outcome": "fp"}
        other = [g for g in range(len(boxes)) if truth.classes[g] != det.class_id and ious[g] >= threshold]
        if other:
            g = max(other, key=lambda g: ious[g])
            rec["confused_with"] = {"gt_index": g, "class_id": truth.classes[g], "class_name": truth.names[g],
                                    "iou": round(ious[g], 4)}
        records.append((d, rec))
    ordered = [rec for _, rec in sorted(records, key=lambda r: r[0])]
    return ordered, [g for g in range(len(boxes)) if g not in taken]


def plan(adapter: Adapter, outputs: Any, metas: list[dict], model: nn.Module,
         detections: list[list[Detection]] | None, labels: Sequence[Truth | None] | None,
         regions: Sequence[Sequence[Region]] | None, threshold: float = 0.5
         ) -> tuple[list[Target], list[dict[str, Any]]]:
    """The targets of the missed objects and user boxes of each image, and each image's outcomes:
    ``detections`` (match records), ``ground_truth``, ``missed`` and ``user_boxes`` (``region_record``s)."""
    targets: list[Target] = []
    outcomes: list[dict[str, Any]] = []
    for b in range(len(metas)):
        dets = detections[b] if detections is not None else []
        info: dict[str, Any] = {}
        todo: list[tuple[str, int, Region]] = []
        truth = labels[b] if labels is not None else None
        if truth is not None:
            info["detections"], missed = match(dets, truth, threshold)
            info["ground_truth"] = [{"box": [round(v, 2) for v in box], "class_id": c, "class_name": n}
                                    for box, c, n in zip(truth.boxes.tolist(), truth.classes, truth.names)]
            info["missed"] = []
            for g in missed:
                if truth.classes[g] is None:  # a class the model does not have: no candidate of it
                    continue
                todo.append(("missed", len(info["missed"]), Region(tuple(truth.boxes[g].tolist()), truth.classes[g])))
                info["missed"].append({"gt_index": g})
        if regions is not None and regions[b]:
            info["user_boxes"] = [{} for _ in regions[b]]
            todo += [("user_box", k, r) for k, r in enumerate(regions[b])]
        for kind, k, region in todo:
            cand = adapter.candidate(outputs, metas, model, b, region.box, region.class_id)
            item = (info["missed"] if kind == "missed" else info["user_boxes"])[k]
            item.update(region_record(adapter, adapter.class_names(model), region, cand, dets, kind == "missed"))
            if cand is not None:
                targets.append(Target(b, cand.class_id, cand.class_name, detection=cand, subject=(kind, k)))
        outcomes.append(info)
    return targets, outcomes


def region_record(adapter: Adapter, names: list[str] | None, region: Region, cand: Detection | None,
                  detections: Sequence[Detection], missed: bool) -> dict[str, Any]:
    """A missed object's or user box's manifest record: its box, class, the model's best candidate for it
    and, for a candidate the model did not output, why: its score against ``conf`` and the detection
    that suppressed it (the kept box overlapping it most, above the NMS ``iou``, scoring at least as high)."""
    cls = region.class_id
    rec: dict[str, Any] = {"gt_box" if missed else "box": [round(v, 2) for v in region.box]}
    if cls is not None or missed:
        rec.update(class_id=cls, class_name=names[cls] if names and cls is not None and cls < len(names) else str(cls))
    if missed:
        rec["outcome"] = "fn"
    if cand is None:
        rec["candidate"] = None
        return rec
    rec["candidate"] = {"box": [round(v, 2) for v in cand.box], "class_id": cand.class_id,
                        "class_name": cand.class_name, "score": round(cand.score, 5),
                        "iou": round(pair_iou(cand.box, region.box), 4),
                        **({"model_index": cand.index} if cand.index is not None else {})}
    options = getattr(adapter, "options", {})
    conf, nms = options.get("conf"), options.get("iou")
    why: dict[str, Any] = {}
    if conf is not None:
        why.update(threshold=float(conf), below_threshold=cand.score < float(conf))
    if cand.probs is not None and len(cand.probs):
        top = int(cand.probs[:len(names) if names else len(cand.probs)].argmax())
        if top != cand.class_id:
            why["top_class"] = {"class_id": top, "class_name": names[top] if names else str(top),
                                "score": round(float(cand.probs[top]), 5)}
    over = [(k, pair_iou(d.box, cand.box)) for k, d in enumerate(detections) if d.score >= cand.score
            and d.index != cand.index]
    over = [(k, v) for k, v in over if v > (float(nms) if nms is not None else 0.5)]
    if over and (conf is None or cand.score >= float(conf)):
        k, v = max(over, key=lambda kv: kv[1])
        why["suppressed_by"] = {"box_index": k, "class_name": detections[k].class_name, "iou": round(v, 4)}
    rec["why"] = why
    return rec


ScoreFn = Callable[[Any, list[Target]], Tensor]


@dataclass
class Errors:
    """What ``Explainer(...)(labels=, regions=, contrast=)`` asks for, resolved: per image its ground truth
    (or None) and its user boxes; the contrast class; the matching IoU."""

    labels: list[Truth | None] | None
    regions: list[list[Region]] | None
    contrast: int | None
    match_iou: float

    @classmethod
    def of(cls, adapter: Adapter, model: nn.Module, labels: Any, regions: Any, contrast: Any, match_iou: float,
           black_box: bool) -> Errors | None:
        """The request, checked before anything runs; None when there is none."""
        if labels is None and regions is None and contrast is None:
            return None
        if not hasattr(adapter, "candidate"):
            raise CamframeError(f"labels, boxes to explain and contrast apply to detectors; adapter {adapter.name!r} "
                                "explains whole images")
        if black_box:
            raise CamframeError("labels, boxes to explain and contrast need a gradient method, not a black-box one")
        if not 0 < match_iou <= 1:
            raise CamframeError(f"the matching IoU must lie in (0, 1], got {match_iou}")
        ids = lambda c: None if c is None else adapter.resolve_classes([c], model)[0]  # noqa: E731
        truths = None if labels is None else [_truth(item, adapter, model) for item in labels]
        boxes = None if regions is None else [[r if isinstance(r, Region) else Region(_xyxy(r[0]), ids(r[1]))
                                               for r in items] for items in regions]
        return cls(truths, boxes, ids(contrast), float(match_iou))

    def subset(self, idx: Sequence[int]) -> Errors:
        """The request for the images ``idx`` of the batch (a group of one input size)."""
        pick = lambda v: None if v is None else [v[i] for i in idx]  # noqa: E731
        return replace(self, labels=pick(self.labels), regions=pick(self.regions))

    def apply(self, adapter: Adapter, outputs: Any, metas: list[dict], model: nn.Module,
              detections: list[list[Detection]] | None, score_fn: ScoreFn, targets: list[Target]
              ) -> tuple[ScoreFn, list[Target], list[dict[str, Any]]]:
        """The score function, targets (the missed objects', user boxes' and confusions' added) and outcomes."""
        for given in (self.labels, self.regions):
            if given is not None and len(given) != len(metas):
                raise CamframeError(f"labels or boxes to explain: {len(given)} item(s) for {len(metas)} image(s)")
        extra, outcomes = plan(adapter, outputs, metas, model, detections, self.labels, self.regions, self.match_iou)
        targets = targets + extra
        if self.contrast is not None:
            targets = [replace(t, contrast=self.contrast) if t.class_id is not None and t.class_id >= 0
                       and t.class_id != self.contrast else t for t in targets]
        for b, info in enumerate(outcomes):  # a false positive over an object of another class: why not that one
            for k, rec in enumerate(info.get("detections", [])):
                other = rec.get("confused_with", {}).get("class_id")
                if other is not None and detections is not None:
                    det = detections[b][k]
                    targets.append(Target(b, det.class_id, det.class_name, box=k, detection=det,
                                          subject=("confusion", k), contrast=other))
        return _contrasted(score_fn), targets, outcomes


def _contrasted(score_fn: ScoreFn) -> ScoreFn:
    """``score_fn`` where a target with a ``contrast`` class scores its class minus that class (same box)."""
    def score(outputs: Any, targets: list[Target]) -> Tensor:
        scores = score_fn(outputs, targets)
        rows = [u for u, t in enumerate(targets) if t.contrast is not None]
        if not rows:
            return scores
        other = score_fn(outputs, [replace(targets[u], class_id=targets[u].contrast) for u in rows])
        mask = torch.zeros(len(targets), dtype=scores.dtype, device=scores.device)
        full = mask.index_put((torch.tensor(rows, device=scores.device),), other.to(scores.dtype))
        return scores - full
    return score


def _xyxy(box: Any) -> Box:
    values = [float(v) for v in (box.tolist() if isinstance(box, Tensor) else box)]
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise CamframeError(f"box {values}: expected x1, y1, x2, y2 with x1 < x2 and y1 < y2")
    return values[0], values[1], values[2], values[3]


def _truth(item: Any, adapter: Adapter, model: nn.Module) -> Truth | None:
    """An image's ground truth: a ``Truth`` as it is, or ``(box, class)`` pairs (class id or name)."""
    if item is None or isinstance(item, Truth):
        return item
    pairs = [(_xyxy(box), c) for box, c in item]
    names = adapter.class_names(model)
    ids = [adapter.resolve_classes([c], model)[0] for _, c in pairs]
    return Truth(torch.tensor([p for p, _ in pairs], dtype=torch.float32).reshape(-1, 4), list(ids),
                 [names[i] if names else str(i) for i in ids])
