"""``camframe evaluate``: methods x layer sets x aggregations, scored against ground-truth boxes."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from camframe import metrics
from camframe.output import pipeline as _pipeline
from camframe.plugins import manager as _plugins
from camframe.core.boxes import pair_iou
from camframe.core.aggregate import parse_aggregate
from camframe.core.errors import CamframeError
from camframe.output.journal import _fingerprint
from camframe.engine.explainer import Explainer, Result
from camframe.engine.smooth import Smooth
from camframe.core.truth import Truth
from camframe.evaluation.log import read_log, record_key
from camframe.evaluation.tables import LOCALISATION, summarise, table_csv, table_markdown

__all__ = ["Config", "Curves", "LOCALISATION", "configs", "score_result", "evaluate", "summarise", "table_markdown",
           "table_csv"]

FILLS = ("blur", "mean", "noise", "zero")
SCHEDULES = ("box", "image")


@dataclass(frozen=True)
class Config:
    method: str
    layers: str  # "default", a preset name, or comma-separated layer names
    aggregate: str  # "max" or "avg", optionally "-common" or "-layer" (the normalisation)
    smooth: str = "none"  # a smoothing (``tta``, ``eigen``, ``noise:N...``) or "none"

    @property
    def key(self) -> str:
        smooth = f" | {self.smooth}" if self.smooth != "none" else ""
        return f"{self.method} | {self.layers} | {self.aggregate}{smooth}"

    def layer_list(self) -> list[str] | None:
        return None if self.layers == "default" else self.layers.split(",")

    def explainer(self, model: Any, adapter: Any = None, options: dict[str, Any] | None = None,
                  method_options: dict[str, Any] | None = None) -> Explainer:
        """An Explainer for this configuration (no guided pass); ``method_options`` go to a black-box
        method (``drise``) and are ignored by the others."""
        how, normalise = parse_aggregate(self.aggregate)
        black_box = getattr(_plugins.resolve_method(self.method)[1], "black_box", False)
        return Explainer(model, layers=self.layer_list(), method=self.method, aggregate=how,
                         adapter=adapter, guided=False, options=options, normalise=normalise, smooth=self.smooth,
                         method_options=method_options if black_box else None)


@dataclass(frozen=True)
class Curves:
    """Deletion/insertion settings: ``steps`` steps, one pair of curves per fill in ``fills``.

    ``schedule="box"``: step k perturbs ``k / steps * extent`` times the target box's area (a
    detector's box; a classifier's ground-truth boxes together); ``"image"``: ``k / steps`` of the
    whole image, as in the literature.
    """

    steps: int = 20
    fills: tuple[str, ...] = ("blur", "mean")
    schedule: str = "box"
    extent: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise CamframeError(f"deletion/insertion steps must be a whole number >= 1, got {self.steps!r}")
        if not self.fills or any(f not in FILLS for f in self.fills):
            raise CamframeError(f"fills must be some of {', '.join(FILLS)}, got {', '.join(self.fills) or 'none'}")
        if self.schedule not in SCHEDULES:
            raise CamframeError(f"schedule must be {' or '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (isinstance(self.extent, (int, float)) and math.isfinite(self.extent) and self.extent > 0):
            raise CamframeError(f"extent must be a positive number of box areas, got {self.extent!r}")


def configs(methods: Sequence[str], layer_sets: Sequence[str], aggregates: Sequence[str],
            smooths: Sequence[str] = ("none",)) -> list[Config]:
    """Every combination of method, layer set, aggregation and smoothing; none may be empty.
    Methods and smoothings go by their canonical names, each once (``hirescam`` is ``elementwise``,
    ``noise:8`` is ``noise:8:0.15``); a black-box method (``drise``) takes no layers and no smoothing,
    so it runs once, unsmoothed, on the adapter's default layers with the first aggregation."""
    for what, items in (("methods", methods), ("layer sets", layer_sets), ("aggregates", aggregates),
                        ("smoothings", smooths)):
        if not items:
            raise CamframeError(f"nothing to evaluate: no {what} given")
    resolved = dict(_plugins.resolve_method(m) for m in methods)  # canonical name: method
    smooth = dict.fromkeys(str(Smooth.parse(s) or "none") for s in smooths)
    out = []
    for name, method in resolved.items():
        if getattr(method, "black_box", False):
            out.append(Config(name, "default", aggregates[0]))
        else:
            out += [Config(name, *combo) for combo in itertools.product(layer_sets, aggregates, smooth)]
    return out


def score_result(ex: Explainer, result: Result, truths: Sequence[Truth], curves: Curves = Curves(),
                 deletion: bool = True) -> list[dict[str, Any]]:
    """One row of metrics per explained target; detectors' targets are matched to a ground-truth box
    of their class (IoU > 0.5), classifiers' maps are scored against all boxes of the image. Matched
    rows get ``deletion_<fill>`` and ``insertion_<fill>`` AUCs (schedule in units of the detection's
    box, or of the classifier's ground-truth boxes together; see ``Curves``) unless ``deletion`` is False."""
    rows: list[dict[str, Any]] = []
    areas: list[float] = []  # each matched row's box area in original pixels (at least one pixel)
    maps = result.original()
    for u, (t, heat) in enumerate(zip(result.targets, maps)):
        truth = truths[t.image]
        row: dict[str, Any] = {"target": u, "image": t.image, "class_id": t.class_id, "class_name": t.class_name,
                               "box": t.box, "score": t.score, "matched": False}
        rows.append(row)
        h, w = heat.shape
        if t.subject is not None:  # a missed object's candidate: its map scored on the object it missed
            if t.subject[0] == "missed" and result.outcomes is not None:
                own = metrics.box_masks(truth.boxes[result.outcomes[t.image]["missed"][t.subject[1]]["gt_index"]][None],
                                        h, w)
                row.update(outcome="fn", pointing_missed=float(metrics.pointing_game(heat[None], masks=own)[0]),
                           ebpg_missed=float(metrics.energy_pointing_game(heat[None], masks=own)[0]))
            continue
        if len(truth.boxes) == 0:
            continue
        if t.detection is not None:
            ious = [(pair_iou(t.detection.box, b.tolist()), i) for i, b in enumerate(truth.boxes)
                    if truth.classes[i] in (None, t.class_id)]
            best = max(ious, default=(0.0, -1))
            if best[0] <= 0.5:
                continue
            own = metrics.box_masks(truth.boxes[best[1]][None], h, w)
            others = torch.cat([truth.boxes[:best[1]], truth.boxes[best[1] + 1:]])
            row["discrimination"] = float(metrics.object_discrimination(
                heat[None], truth.boxes[best[1]][None], [others])[0]) if len(others) else math.nan
            x1, y1, x2, y2 = t.detection.box
            areas.append(max((x2 - x1) * (y2 - y1), 1.0))
        else:
            own = metrics.box_masks(truth.boxes, h, w).any(0, keepdim=True)
            areas.append(max(float(own.sum()), 1.0))
        row["matched"] = True
        row["pointing"] = float(metrics.pointing_game(heat[None], masks=own)[0])
        row["ebpg"] = float(metrics.energy_pointing_game(heat[None], masks=own)[0])
    matched = [u for u, row in enumerate(rows) if row["matched"]]
    if deletion and result.inputs is not None and matched:
        area = _input_areas(ex, result, matched, areas) if curves.schedule == "box" else None
        for fill in curves.fills:
            for mode in ("deletion", "insertion"):
                for u, auc in zip(matched, _curves(ex, result, matched, curves, fill, mode, area)):
                    rows[u][f"{mode}_{fill}"] = auc
    return rows


def _input_areas(ex: Explainer, result: Result, rows: list[int], areas: list[float]) -> Tensor:
    """Original-pixel areas as model-input pixels: scaled by how many input pixels the original
    image reaches (those that differ between a white and a black image; padding does not)."""
    scale: dict[int, float] = {}
    for u in rows:
        image = result.targets[u].image
        if image not in scale:
            h, w = result.metas[image]["size"]
            white = np.full((h, w, 3), 255, np.uint8)
            x, _ = ex.preprocess([white, np.zeros_like(white)])
            scale[image] = float((x[0] != x[1]).any(0).sum()) / (h * w)
    return torch.tensor([a * scale[result.targets[u].image] for u, a in zip(rows, areas)])


def _curves(ex: Explainer, result: Result, rows: list[int], curves: Curves, fill: str, mode: str,
            area: Tensor | None) -> list[float]:
    """The AUC of each row; rows of images whose inputs differ in size (``result.sizes``) in groups of one size."""
    if result.sizes is None:
        return _curve_batch(ex, result, rows, curves, fill, mode, area, None)
    aucs: dict[int, float] = {}
    for size in dict.fromkeys(result.sizes[result.targets[u].image] for u in rows):
        picked = [i for i, u in enumerate(rows) if result.sizes[result.targets[u].image] == size]
        part = _curve_batch(ex, result, [rows[i] for i in picked], curves, fill, mode,
                            None if area is None else area[picked], size)
        aucs.update(zip(picked, part))
    return [aucs[i] for i in range(len(rows))]


def _curve_batch(ex: Explainer, result: Result, rows: list[int], curves: Curves, fill: str, mode: str,
                 area: Tensor | None, size: tuple[int, int] | None) -> list[float]:
    """The AUC of each row, their images' inputs (and maps) cropped to ``size`` where given."""
    assert result.inputs is not None
    h, w = size or result.inputs.shape[-2:]
    targets = [result.targets[u] for u in rows]
    images = result.inputs[[t.image for t in targets]][..., :h, :w]
    metas = [result.metas[t.image] for t in targets]

    def score_fn(batch: Tensor, src: Tensor) -> Tensor:
        with torch.no_grad():
            outputs = ex.model(batch.to(ex.device))
            picked = src.tolist()
            return ex.adapter.rescore(outputs, [metas[i] for i in picked], ex.model,
                                      [targets[i] for i in picked]).float().cpu()

    maps = result.maps[rows][..., :h, :w].cpu()
    _, auc = metrics.deletion_insertion(images.cpu(), maps, score_fn, steps=curves.steps, mode=mode,
                                        fill=fill, batch_size=32,  # type: ignore[arg-type]
                                        generator=torch.Generator().manual_seed(0), area=area, extent=curves.extent)
    return [float(v) for v in auc]


def evaluate(explainers: dict[str, Explainer], paths: Sequence[Path], truth: Any, log: Path, *,
             curves: Curves = Curves(), progress: Any = None, workers: int | None = 0) -> Iterator[dict[str, Any]]:
    """Explain and score every image with every explainer (keyed by its configuration), appending
    one JSON line per (configuration, image) to ``log``; ``workers`` processes decode images ahead
    (None: ``default_workers`` for the model's device). A record whose key (see ``log.record_key``) is in
    ``log`` already is reused, so a run resumes; any change to what determines it recomputes it."""
    if not explainers or not paths:
        raise CamframeError("nothing to evaluate: no " + ("configurations" if not explainers else "images"))
    done = read_log(log)
    contents = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}
    models: dict[int, str] = {}
    with log.open("a") as sink:
        for config, ex in explainers.items():
            if id(ex.model) not in models:
                models[id(ex.model)] = _fingerprint(ex.model)
            model = models[id(ex.model)]
            with ex:
                ahead = _pipeline.default_workers(ex.device) if workers is None else workers
                for path, image in _pipeline.images(paths, ahead):
                    truths = [truth(path, image.shape[:2])]
                    key = record_key(ex, config, model, curves, path, contents[path], truths[0])
                    if key not in done:
                        start = time.perf_counter()
                        detector = hasattr(ex.adapter, "candidate") and not ex.black_box  # missed objects too
                        result = ex([image], labels=truths if detector else None)
                        seconds = time.perf_counter() - start
                        rows = score_result(ex, result, truths, curves)
                        done[key] = {"key": key, "config": config, "path": str(path), "seconds": seconds,
                                     "rows": rows}
                        sink.write(json.dumps(done[key]) + "\n")
                        sink.flush()
                    yield done[key]
                    if progress is not None:
                        progress.update(1)
