"""``camframe evaluate``: methods x layer sets x aggregations, scored against ground-truth boxes."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from camframe import metrics
from camframe.output import pipeline as _pipeline
from camframe.plugins import manager as _plugins
from camframe.core.boxes import pair_iou
from camframe.core.aggregate import parse_aggregate
from camframe.core.errors import CamframeError
from camframe.output.journal import _fingerprint, digest
from camframe.engine.explainer import Explainer, Result
from camframe.engine.smooth import Smooth
from camframe.core.truth import Truth

__all__ = ["Config", "Curves", "LOCALISATION", "configs", "score_result", "evaluate", "summarise", "table_markdown",
           "table_csv"]

LOCALISATION = ("pointing", "ebpg", "discrimination")
FILLS = ("blur", "mean", "noise", "zero")
SCHEDULES = ("box", "image")
_LOWER_IS_BETTER = ("discrimination", "deletion")
_HEADS = {"pointing": "pointing ↑", "ebpg": "EBPG ↑", "discrimination": "discrimination ↓",
          "deletion": "deletion ↓", "insertion": "insertion ↑"}


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


def _key(ex: Explainer, config: str, model: str, curves: Curves, path: Path, image: str, truth: Truth) -> str:
    """What determines a record: configuration, model, adapter and its options, metric settings,
    image (path and content) and its ground truth."""
    parts = {"config": config, "model": model, "adapter": ex.adapter.name,
             "options": getattr(ex.adapter, "options", {}), "method": ex.method_name, "layers": list(ex.layers),
             "aggregate": ex.aggregate, "normalise": ex.normalise, "smooth": ex.smooth and str(ex.smooth),
             "method_options": ex.method_options, "curves": dataclasses.asdict(curves),
             "path": str(path), "image": image, "truth": [truth.boxes.tolist(), truth.classes]}
    return digest(parts)


def _record(line: str) -> dict[str, Any] | None:
    """A log line's record, or None when it is not one this version wrote."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    fields = {"key": str, "config": str, "path": str, "seconds": (int, float), "rows": list}
    ok = isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in fields.items())
    return record if ok else None


def _done(path: Path) -> dict[str, dict[str, Any]]:
    """Records already in the log, by key. Malformed lines (one cut short by an interruption, one
    from an older version) are dropped from it, with one warning line on stderr."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    kept, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        record = _record(line) if line.strip() else None
        if record is not None:
            done[record["key"]] = record
            kept.append(line + "\n")
        elif line.strip():
            bad.append(str(number))
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        print(f"camframe: warning: {path}: skipped {len(bad)} malformed line(s) ({shown}); they are redone",
              file=sys.stderr)
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        part.write_text("".join(kept))
        os.replace(part, path)  # atomically: an interruption now loses nothing
    return done


def evaluate(explainers: dict[str, Explainer], paths: Sequence[Path], truth: Any, log: Path, *,
             curves: Curves = Curves(), progress: Any = None, workers: int | None = 0) -> Iterator[dict[str, Any]]:
    """Explain and score every image with every explainer (keyed by its configuration), appending
    one JSON line per (configuration, image) to ``log``; ``workers`` processes decode images ahead
    (None: ``default_workers`` for the model's device). A record whose key (see ``_key``) is in
    ``log`` already is reused, so a run resumes; any change to what determines it recomputes it."""
    if not explainers or not paths:
        raise CamframeError("nothing to evaluate: no " + ("configurations" if not explainers else "images"))
    done = _done(log)
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
                    key = _key(ex, config, model, curves, path, contents[path], truths[0])
                    if key not in done:
                        start = time.perf_counter()
                        result = ex([image])
                        seconds = time.perf_counter() - start
                        rows = score_result(ex, result, truths, curves)
                        done[key] = {"key": key, "config": config, "path": str(path), "seconds": seconds,
                                     "rows": rows}
                        sink.write(json.dumps(done[key]) + "\n")
                        sink.flush()
                    yield done[key]
                    if progress is not None:
                        progress.update(1)


def _metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics present: localisation, then ``deletion_<fill>``/``insertion_<fill>`` per fill."""
    curves = dict.fromkeys(k for row in rows for k in row if k.startswith(("deletion_", "insertion_")))
    return [*LOCALISATION, *curves]


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: each metric's mean and 95 % interval, targets, matched share, s/image."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_config.setdefault(r["config"], []).append(r)
    names = _metrics([row for r in records for row in r["rows"]])
    table = []
    for key, recs in by_config.items():
        rows = [row for r in recs for row in r["rows"]]
        matched = [row for row in rows if row.get("matched")]
        entry: dict[str, Any] = {"config": key, "images": len(recs), "targets": len(rows), "matched": len(matched),
                                 "seconds": sum(r["seconds"] for r in recs) / len(recs), "metrics": names}
        for m in names:
            values = [row[m] for row in matched if row.get(m) is not None]
            bounds = (0.0, 1.0) if m in LOCALISATION else None  # shares and hits; the curves' AUCs may pass 1
            entry[m] = metrics.mean_ci(values, bounds=bounds) if values else (math.nan, math.nan, math.nan)
        table.append(entry)
    return table


def _fmt(ci: tuple[float, float, float]) -> str:
    """``mean ± half-width``, or ``mean (low–high)`` where the interval is not symmetric (cut at 0 or 1)."""
    mean, low, high = ci
    if math.isnan(mean):
        return "–"
    if math.isclose(mean - low, high - mean, abs_tol=5e-4):
        return f"{mean:.3f} ± {(high - low) / 2:.3f}"
    return f"{mean:.3f} ({low:.3f}–{high:.3f})"


def _head(metric: str) -> str:
    kind, _, fill = metric.partition("_")
    return _HEADS[kind] + (f" ({fill})" if fill else "")


def table_markdown(table: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (best value of each metric in bold)."""
    names = table[0]["metrics"] if table else list(LOCALISATION)
    best = {}
    for m in names:
        vals = [e[m][0] for e in table if not math.isnan(e[m][0])]
        if vals:
            best[m] = min(vals) if m.startswith(_LOWER_IS_BETTER) else max(vals)
    head = ["method · layers · aggregate", "targets (matched)", *map(_head, names), "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = [e["config"].replace(" | ", " · "), f"{e['targets']} ({e['matched']})"]
        for m in names:
            text = _fmt(e[m])
            cells.append(f"**{text}**" if m in best and e[m][0] == best[m] else text)
        cells.append(f"{e['seconds']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(table: Sequence[dict[str, Any]]) -> str:
    """The summary as CSV: mean, low and high of each metric (``deletion_blur_mean``...)."""
    names = table[0]["metrics"] if table else list(LOCALISATION)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "layers", "aggregate", "smooth", "images", "targets", "matched", "seconds_per_image",
                     *[f"{m}_{s}" for m in names for s in ("mean", "low", "high")]])
    for e in table:
        writer.writerow([*(e["config"].split(" | ") + ["none"])[:4], e["images"], e["targets"], e["matched"],
                         f"{e['seconds']:.4f}", *[f"{v:.4f}" for m in names for v in e[m]]])
    return buf.getvalue()
