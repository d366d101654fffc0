"""Evidence for docs/evaluation.md beyond the shapes grid: the anchors (YOLOv8-Explainer, the
receptive-field window), the sanity check with its baseline, the real photos (COCO YOLO11n and
YOLO11n-seg, MobileNetV2), the classifier composites and the defaults check."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import ultralytics.nn.tasks
import ultralytics.utils.nms
import ultralytics.utils.ops
from camframe_ultralytics import YOLOAdapter
from pytorch_grad_cam import EigenGradCAM
from torch import Tensor

# yolov8-explainer 0.0.5 imports names that Ultralytics 8.4 moved (NMS, to utils.nms) or dropped (its
# checkpoint loader, which is not used here)
if not hasattr(ultralytics.utils.ops, "non_max_suppression"):
    ultralytics.utils.ops.non_max_suppression = ultralytics.utils.nms.non_max_suppression
if not hasattr(ultralytics.nn.tasks, "attempt_load_weights"):
    ultralytics.nn.tasks.attempt_load_weights = None
from YOLOv8_Explainer.core import ActivationsAndGradients as ExplainerHooks  # noqa: E402
from YOLOv8_Explainer.core import yolov8_target  # noqa: E402

import camframe
from camframe import metrics
from camframe.evaluation.harness import Config, Curves, score_result
from camframe.engine.explainer import Result
from camframe.core.truth import Truth, TruthSource

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
Maps = Callable[[camframe.Explainer, Result], Tensor]
Item = tuple  # (image, Truth) or (image, Truth, target class ids)


def records(ex: camframe.Explainer, key: str, data: Sequence[Item], curves: Curves,
            maps: Maps | None = None, deletion: bool = True) -> list[dict]:
    """One record per image: ``ex``'s maps (or ``maps``' replacement of them) scored against the truth;
    an item's third element, if any, is the target (class ids) to explain."""
    out = []
    with ex:
        for image, truth, *target in data:
            start = time.perf_counter()
            result = ex([image], target=target[0] if target else None)
            if maps is not None:
                result.maps = maps(ex, result).to(result.maps)
            seconds = time.perf_counter() - start
            out.append({"config": key, "path": "", "seconds": seconds,
                        "rows": score_result(ex, result, [truth], curves, deletion=deletion)})
    return out


# --- anchors ---------------------------------------------------------------------------------

def explainer_layers(model: torch.nn.Module) -> list[int]:
    """YOLOv8-Explainer's default layers ``[12, 17, 21]`` (YOLOv8: the first top-down C2f, the
    concat before the P4 output, the P5 output), mapped to the same modules of a YOLO11 neck."""
    shift = model.model[-1].f[-1] - 21  # v8: head reads 15, 18, 21; YOLO11: 16, 19, 22
    return [12 + shift, 17 + shift, 21 + shift]


class _Detections(torch.nn.Module):
    """The model as yolov8-explainer reads it: ``output[0]`` is ``(B, 4 + nc, anchors)`` (a Segment
    head gives a tuple there, its boxes and scores followed by mask coefficients)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.nc = model, len(model.names)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        y = self.model(x)[0]
        return ((y[0] if isinstance(y, (tuple, list)) else y)[:, :4 + self.nc],)


def yolov8_explainer(ex: camframe.Explainer, result: Result) -> Tensor:
    """``yolov8-explainer==0.0.5``'s map, as its ``yolov8_heatmap`` makes it with its defaults
    (EigenGradCAM, its hooks, target: the sum of the top 2 % pre-NMS class scores and boxes above
    conf 0.2), on camframe's letterboxed input; one map per image, for every box of it."""
    model = copy.deepcopy(ex.model).eval().requires_grad_(True)
    layers = [model.model[i] for i in explainer_layers(model)]
    wrapped = _Detections(model)
    cam = EigenGradCAM(wrapped, layers)  # its `use_cuda=` is gone from pytorch-grad-cam 1.5
    cam.activations_and_grads.release()
    cam.activations_and_grads = ExplainerHooks(wrapped, layers, None)
    try:
        grayscale = cam(result.inputs.clone(), [yolov8_target("all", 0.2, 0.02)])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(grayscale[0])[None].expand(len(result.targets), -1, -1)


def window(activations: Tensor, gradients: Tensor) -> Tensor:
    """The receptive-field window alone: ``sum_c |G|`` (the map of a constant activation)."""
    return gradients.abs().sum(1)


window.needs_gradients = True  # type: ignore[attr-defined]


def drise(masks: int) -> tuple[Config, dict]:
    """camframe's D-RISE (``--method drise``) with ``masks`` masks per image."""
    return Config("drise", "default", "max"), {"masks": masks}


# --- sanity check with the window baseline ----------------------------------------------------

class CarriedOver(YOLOAdapter):
    """The YOLO adapter with given detections, so a re-initialised model explains the same boxes."""

    def __init__(self, detections: list) -> None:
        super().__init__()
        self.carried = detections

    def detect(self, outputs: Any, metas: list[dict], model: torch.nn.Module) -> list:
        return self.carried


def top_layers(model: torch.nn.Module) -> list[str]:
    """The head and the last two neck modules of its P5 branch (v8: 22, 21, 19; YOLO11: 23, 22, 20)."""
    head = len(model.model) - 1
    return [f"model.{head}", f"model.{head - 1}", f"model.{head - 3}"]


WINDOW_FLOOR = 0.05  # "inside the window": where the trained model's window is at least this share of its peak


def _inside(window: Tensor) -> Tensor:
    """Bool ``(N, H, W)``: the pixels where each box's window reaches ``WINDOW_FLOOR`` of its peak."""
    return window >= WINDOW_FLOOR * window.flatten(1).amax(1)[:, None, None]


def _rho_inside(first: Tensor, again: Tensor, inside: Tensor) -> Tensor:
    """Spearman ρ per map pair over the pixels ``inside`` marks only."""
    return torch.cat([metrics.sanity_check(a[m][None, None], b[m][None, None])
                      for a, b, m in zip(first, again, inside)])


def detector_sanity(model: torch.nn.Module, images: Sequence[Any], grid: Sequence[Config]) -> dict[str, tuple]:
    """Adebayo et al.'s check per configuration: Spearman ρ between the maps of the trained model and
    of one with its top layers re-initialised (same boxes and classes), and the same ρ for the
    receptive-field window at the same layers; over the whole image and inside the window (where
    far from the box both maps only follow the window's decay, which no weight moves).
    {config key: (ρ, window ρ, ρ inside, window ρ inside, boxes)}."""
    randomized = metrics.randomize_layers(model, top_layers(model))
    out = {}
    for config in grid:
        rhos: list[list[Tensor]] = [[], [], [], []]
        for image in images:
            trained = config.explainer(model)([image])
            if not trained.targets:
                continue
            pair = []
            for net, adapter in ((model, None), (randomized, CarriedOver(trained.detections))):
                ex = config.explainer(net, adapter=adapter)
                ex.method = window
                pair.append(ex([image]).maps)
            again = config.explainer(randomized, adapter=CarriedOver(trained.detections))([image]).maps
            inside = _inside(pair[0])
            for i, rho in enumerate((metrics.sanity_check(trained.maps, again), metrics.sanity_check(*pair),
                                     _rho_inside(trained.maps, again, inside), _rho_inside(*pair, inside))):
                rhos[i].append(rho)
        means = [float(torch.cat(r).nanmean()) if r else math.nan for r in rhos]
        out[config.key] = (*means, sum(len(r) for r in rhos[0]))
    return out


def sanity_markdown(results: dict[str, tuple], what: str) -> str:
    lines = [f"| method · layers · aggregate | ρ, trained vs {what} re-initialised (↓) | ρ of the window "
             "Σ_c abs(G) at the same layers | ρ inside the window (↓) | the window's ρ inside it | "
             "ρ inside below the window's by |", "|---|---|---|---|---|---|"]
    for key, (rho, win, rho_in, win_in, n) in results.items():
        lines.append(f"| {key.replace(' | ', ' · ')} | {rho:.3f} ({n} boxes) | {win:.3f} | {rho_in:.3f} | "
                     f"{win_in:.3f} | {win_in - rho_in:+.3f} |")
    return "\n".join(lines) + "\n"


# --- defaults check ---------------------------------------------------------------------------

CURVE_METRICS = ("deletion_blur", "insertion_blur", "deletion_mean", "insertion_mean")
CONSTANT_WINDOW_BOUND = 0.5  # the ρ a classifier's default must stay below (its window is the whole image)
SANITY_MARGIN = 0.1  # "clearly below" the window's ρ: by at least Cohen's small effect for a correlation


def _sanity_bound(win: float, margin: float) -> float:
    """The highest ρ inside the window that passes: ``margin`` below the window's own, or
    ``CONSTANT_WINDOW_BOUND`` where the window is constant (ρ nan)."""
    return win - margin if not math.isnan(win) else CONSTANT_WINDOW_BOUND


def passes_sanity(entry: tuple, margin: float = SANITY_MARGIN) -> bool:
    """Is a sanity entry's ρ inside the window at or below ``_sanity_bound``?"""
    _, _, rho, win, _ = entry
    return rho <= _sanity_bound(win, margin)


def _better(metric: str, a: float, b: float) -> bool:
    """Is ``a`` better than ``b`` on ``metric`` (deletion: lower)?"""
    return a < b if metric.startswith("deletion") else a > b


def _within(metric: str, value: float, interval: tuple[float, float, float]) -> bool:
    """Is ``value`` not beaten by the interval ``(mean, low, high)``: inside it or better than all of it
    (deletion: ``value <= high``; insertion: ``value >= low``)?"""
    _, low, high = interval
    return value <= high if metric.startswith("deletion") else value >= low


def _candidate(key: str) -> bool:
    """A camframe ``method | layers | aggregate`` (not an anchor, and unsmoothed: a smoothing is a
    further option on top of any of them, at several times the cost, measured in docs/smoothing.md)."""
    return key.count(" | ") == 2


def challengers(table: Sequence[dict], default: str) -> list[str]:
    """The unsmoothed camframe configurations whose 95 % interval excludes the default's mean, on its
    better side, on some curve metric: those that must pass the sanity check to count as the best."""
    mine = {e["config"]: e for e in table}[default]
    out = []
    for e in table:
        if not _candidate(e["config"]) or e["config"] == default:
            continue
        if any(m in e and m in mine and not math.isnan(e[m][0]) and not _within(m, mine[m][0], e[m])
               for m in CURVE_METRICS):
            out.append(e["config"])
    return out


def defaults_check(table: Sequence[dict], default: str, sanity: dict[str, tuple] | None = None,
                   margin: float = SANITY_MARGIN) -> tuple[str, bool]:
    """Is ``default`` within the 95 % interval of the best unsmoothed camframe configuration (the
    anchors left out) that passes the sanity check, on every curve metric, and does it pass the check itself: its ρ inside
    the window at least ``margin`` below the window's own (below ``CONSTANT_WINDOW_BOUND`` where the
    window is constant)? Configurations without a sanity entry count. A Markdown table and the verdict."""
    sanity = sanity or {}
    mine = {e["config"]: e for e in table}[default]
    lines = ["| metric | best configuration passing the sanity check | its mean (95 % interval) | default | "
             "within? | better but failing the sanity check |", "|---|---|---|---|---|---|"]
    ok = True
    for m in CURVE_METRICS:
        scored = [e for e in table if _candidate(e["config"]) and m in e and not math.isnan(e[m][0])]
        if not scored or m not in mine:
            continue
        ranked = sorted(scored, key=lambda e: e[m][0], reverse=not m.startswith("deletion"))
        failing = [e for e in ranked if e["config"] in sanity and not passes_sanity(sanity[e["config"]], margin)]
        best = next((e for e in ranked if e not in failing), mine)  # none passes: the default itself
        mean, low, high = best[m]
        inside = _within(m, mine[m][0], best[m])
        ok &= inside
        beaten = [f"{e['config'].replace(' | ', ' · ')} {e[m][0]:.3f}" for e in failing if _better(m, e[m][0], mean)]
        lines.append(f"| {m.replace('_', ' ')} | {best['config'].replace(' | ', ' · ')} | {mean:.3f} "
                     f"({low:.3f}–{high:.3f}) | {mine[m][0]:.3f} | {'yes' if inside else '**no**'} | "
                     f"{', '.join(beaten) or '–'} |")
    if default in sanity:
        _, _, rho, win, _ = sanity[default]
        bound = _sanity_bound(win, margin)
        passed = rho <= bound
        ok &= passed
        lines.append(f"| sanity ρ inside the window ≤ {bound:.3f} (the window's ρ − {margin}, or "
                     f"{CONSTANT_WINDOW_BOUND} where the window is constant) | – | – | "
                     f"{rho:.3f} (window {win:.3f}) | {'yes' if passed else '**no**'} | – |")
    return "\n".join(lines) + "\n", ok


def paired(records: Sequence[dict], config: str, baseline: str, names: Sequence[str]) -> dict[str, tuple]:
    """Per metric, ``config`` minus ``baseline`` on the same matched targets (records of the same
    images in the same order): the mean difference, its 95 % interval and the number of pairs."""
    def rows(key: str) -> dict[tuple, dict]:
        mine = [r for r in records if r["config"] == key]
        return {(i, row["target"]): row for i, r in enumerate(mine) for row in r["rows"] if row.get("matched")}

    a, b = rows(config), rows(baseline)
    out = {}
    for m in names:
        diffs = [d for k in sorted(a.keys() & b.keys()) if a[k].get(m) is not None and b[k].get(m) is not None
                 for d in [a[k][m] - b[k][m]] if not math.isnan(d)]
        out[m] = (*metrics.mean_ci(diffs), len(diffs))
    return out


# --- real photos ------------------------------------------------------------------------------

def add_cache(parser: argparse.ArgumentParser) -> None:
    """``--cache``: where ``make setup`` put the real photos, composites and COCO YOLO11n checkpoints."""
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("CAMFRAME_CACHE") or ROOT / ".cache"),
                        help="the real photos, composites and COCO YOLO11n checkpoints (scripts/yolo11n_coco.py)")


def real_photo_paths(cache: Path) -> list[Path]:
    """The real-photo set's photos, copied from their packages (scripts/real_photos.py) into ``cache``."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import real_photos

    return real_photos.copy_photos(cache / "photos", real_photos.cache_dir())


def yolo_checkpoints(cache: Path) -> dict[str, Path]:
    """The COCO YOLO11n and YOLO11n-seg checkpoints in ``cache``, rebuilt first if absent."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import yolo11n_coco

    return yolo11n_coco.build(cache)


def yolo_data(model: torch.nn.Module, paths: Sequence[Path]) -> list[Item]:
    names = model.names
    truth = TruthSource(DATA / "real_coco.json", [names[i] for i in sorted(names)])
    return [(image, truth(p, image.shape[:2])) for p in paths for image in [camframe.load_image(p)]]


def classifier_data(paths: Sequence[Path], model: torch.nn.Module) -> tuple[list[Item], list[Item]]:
    """Real photos for MobileNetV2: with its top-1 target (scored against all boxes of the photo),
    and one item per (photo, COCO category with ImageNet classes): the target is the
    highest-scoring ImageNet class of the category (benchmarks/data/coco_to_imagenet.json),
    scored against that category's boxes."""
    mapping = json.loads((DATA / "coco_to_imagenet.json").read_text())
    coco = TruthSource(DATA / "real_coco.json", None)
    top1, gt = [], []
    ex = camframe.Explainer(model, guided=False)
    with ex:
        for p in paths:
            image = camframe.load_image(p)
            truth = coco(p, image.shape[:2])
            top1.append((image, Truth(truth.boxes, [None] * len(truth.names), truth.names)))
            x, _ = ex.preprocess([image])
            with torch.no_grad():
                logits = ex.model(x.to(ex.device))[0]
            for name in dict.fromkeys(truth.names):
                if name not in mapping:
                    continue
                ids = torch.tensor(mapping[name])
                best = int(ids[logits[ids].argmax()])
                keep = [i for i, n in enumerate(truth.names) if n == name]
                gt.append((image, Truth(truth.boxes[keep], [None] * len(keep), [name] * len(keep)), [best]))
    return top1, gt


def composite_data(out: Path) -> list[Item]:
    """The two-object composites (scripts/composites.py): one item per half, its class as target,
    its own half as the only box (the map for class A must land on A's half)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import composites

    coco = composites.build(out)
    data = []
    for entry in coco["images"]:
        image = camframe.load_image(out / entry["file_name"])
        for a in (a for a in coco["annotations"] if a["image_id"] == entry["id"]):
            x, y, w, h = a["bbox"]
            data.append((image, Truth(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32), [None], ["half"]),
                         [a["category_id"]]))
    return data
