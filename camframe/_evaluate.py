"""``camframe evaluate``: methods x layer sets x aggregations, scored against ground-truth boxes."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from . import metrics
from ._adapter import _iou
from ._explainer import Explainer, Result
from ._images import load_image
from ._truth import Truth

__all__ = ["Config", "METRICS", "configs", "score_result", "evaluate", "summarise", "table_markdown", "table_csv"]

METRICS = ("pointing", "ebpg", "discrimination", "deletion", "insertion")
_LOWER_IS_BETTER = {"discrimination", "deletion"}


@dataclass(frozen=True)
class Config:
    method: str
    layers: str  # "default", a preset name, or comma-separated layer names
    aggregate: str

    @property
    def key(self) -> str:
        return f"{self.method} | {self.layers} | {self.aggregate}"

    def layer_list(self) -> list[str] | None:
        return None if self.layers == "default" else self.layers.split(",")

    def explainer(self, model: Any, adapter: Any = None, options: dict[str, Any] | None = None) -> Explainer:
        """An Explainer for this configuration (no guided pass)."""
        return Explainer(model, layers=self.layer_list(), method=self.method, aggregate=self.aggregate,
                         adapter=adapter, guided=False, options=options)


def configs(methods: Sequence[str], layer_sets: Sequence[str], aggregates: Sequence[str]) -> list[Config]:
    """Every combination of method, layer set and aggregation."""
    return [Config(*combo) for combo in itertools.product(methods, layer_sets, aggregates)]


def score_result(ex: Explainer, result: Result, truths: Sequence[Truth], steps: int = 20, fill: str = "blur",
                 deletion: bool = True) -> list[dict[str, Any]]:
    """One row of metrics per explained target; detectors' targets are matched to a ground-truth box
    of their class (IoU > 0.5), classifiers' maps are scored against all boxes of the image."""
    rows: list[dict[str, Any]] = []
    if not result.targets:
        return rows
    maps = result.original()
    for u, (t, heat) in enumerate(zip(result.targets, maps)):
        truth = truths[t.image]
        row: dict[str, Any] = {"target": u, "image": t.image, "class_id": t.class_id, "class_name": t.class_name,
                               "box": t.box, "score": t.score}
        h, w = heat.shape
        if len(truth.boxes) == 0:
            rows.append({**row, "matched": False})
            continue
        if t.detection is not None:
            ious = [(_iou(t.detection.box, b.tolist()), i) for i, b in enumerate(truth.boxes)
                    if truth.classes[i] in (None, t.class_id)]
            best = max(ious, default=(0.0, -1))
            if best[0] <= 0.5:
                rows.append({**row, "matched": False})
                continue
            own = metrics.box_masks(truth.boxes[best[1]][None], h, w)
            others = torch.cat([truth.boxes[:best[1]], truth.boxes[best[1] + 1:]])
            row["discrimination"] = float(metrics.object_discrimination(
                heat[None], truth.boxes[best[1]][None], [others])[0]) if len(others) else math.nan
        else:
            own = metrics.box_masks(truth.boxes, h, w).any(0, keepdim=True)
        row["matched"] = True
        row["pointing"] = float(metrics.pointing_game(heat[None], masks=own)[0])
        row["ebpg"] = float(metrics.energy_pointing_game(heat[None], masks=own)[0])
        rows.append(row)
    if deletion and result.inputs is not None:
        for mode in ("deletion", "insertion"):
            for row, auc in zip(rows, _curves(ex, result, steps, fill, mode)):
                row[mode] = auc
    return rows


def _curves(ex: Explainer, result: Result, steps: int, fill: str, mode: str) -> list[float]:
    assert result.inputs is not None
    images = result.inputs[[t.image for t in result.targets]]
    metas = [result.metas[t.image] for t in result.targets]

    def score_fn(batch: Tensor, src: Tensor) -> Tensor:
        with torch.no_grad():
            outputs = ex.model(batch.to(ex.device))
            rows = src.tolist()
            return ex.adapter.rescore(outputs, [metas[i] for i in rows], ex.model,
                                      [result.targets[i] for i in rows]).float().cpu()

    _, auc = metrics.deletion_insertion(images.cpu(), result.maps.cpu(), score_fn, steps=steps, mode=mode,
                                        fill=fill, batch_size=32, generator=torch.Generator().manual_seed(0))
    return [float(v) for v in auc]


def _done(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Records already in the log; a line cut short by an interruption is dropped from it."""
    done, kept = {}, []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            done[(record["config"], record["path"])] = record
            kept.append(line + "\n")
        path.write_text("".join(kept))
    return done


def evaluate(explainers: dict[str, Explainer], paths: Sequence[Path], truth: Any, log: Path, *, steps: int = 20,
             fill: str = "blur", progress: Any = None) -> Iterator[dict[str, Any]]:
    """Explain and score every image with every explainer (keyed by its configuration), appending
    one JSON line per (configuration, image) to ``log``; pairs already in ``log`` are skipped, so a
    run resumes."""
    done = _done(log)
    with log.open("a") as sink:
        for key, ex in explainers.items():
            with ex:
                for path in paths:
                    if (key, str(path)) in done:
                        yield done[(key, str(path))]
                    else:
                        image = load_image(path)
                        start = time.perf_counter()
                        result = ex([image])
                        seconds = time.perf_counter() - start
                        rows = score_result(ex, result, [truth(path, image.shape[:2])], steps, fill)
                        record = {"config": key, "path": str(path), "seconds": seconds, "rows": rows}
                        sink.write(json.dumps(record) + "\n")
                        sink.flush()
                        yield record
                    if progress is not None:
                        progress.update(1)


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: each metric's mean and 95 % interval, targets, matched share, s/image."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_config.setdefault(r["config"], []).append(r)
    table = []
    for key, recs in by_config.items():
        rows = [row for r in recs for row in r["rows"]]
        matched = [row for row in rows if row.get("matched")]
        entry: dict[str, Any] = {"config": key, "images": len(recs), "targets": len(rows),
                                 "matched": len(matched), "seconds": sum(r["seconds"] for r in recs) / len(recs)}
        for m in METRICS:
            values = [row[m] for row in matched if m in row and row[m] is not None]
            entry[m] = metrics.mean_ci(values) if values else (math.nan, math.nan, math.nan)
        table.append(entry)
    return table


def _fmt(ci: tuple[float, float, float]) -> str:
    mean, low, high = ci
    return "–" if math.isnan(mean) else f"{mean:.3f} ± {(high - low) / 2:.3f}"


def table_markdown(table: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (best value of each metric in bold)."""
    best = {}
    for m in METRICS:
        vals = [e[m][0] for e in table if not math.isnan(e[m][0])]
        if vals:
            best[m] = min(vals) if m in _LOWER_IS_BETTER else max(vals)
    head = ["method · layers · aggregate", "targets (matched)", "pointing ↑", "EBPG ↑", "discrimination ↓",
            "deletion ↓", "insertion ↑", "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = [e["config"].replace(" | ", " · "), f"{e['targets']} ({e['matched']})"]
        for m in METRICS:
            text = _fmt(e[m])
            cells.append(f"**{text}**" if m in best and e[m][0] == best[m] else text)
        cells.append(f"{e['seconds']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(table: Sequence[dict[str, Any]]) -> str:
    """The summary as CSV: mean, low and high of each metric."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "layers", "aggregate", "images", "targets", "matched", "seconds_per_image",
                     *[f"{m}_{s}" for m in METRICS for s in ("mean", "low", "high")]])
    for e in table:
        writer.writerow([*e["config"].split(" | "), e["images"], e["targets"], e["matched"], f"{e['seconds']:.4f}",
                         *[f"{v:.4f}" for m in METRICS for v in e[m]]])
    return buf.getvalue()
