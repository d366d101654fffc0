"""The ``camframe`` command: ``explain``, ``evaluate``, ``layers``, ``plugins``."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import __version__, _plugins
from ._adapter import probe
from ._aggregate import AGGREGATES
from ._errors import CamframeError
from ._evaluate import configs, summarise, table_csv, table_markdown
from ._evaluate import evaluate as run_evaluation
from ._explainer import Explainer, Result
from ._images import expand_inputs, load_image
from ._output import OutputDir, slug
from ._render import draw_boxes, gradient_image, overlay
from ._report import render, table_html
from ._truth import TruthSource

__all__ = ["main", "build_parser"]


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    words = {"true": True, "false": False, "none": None}
    if value.lower() in words:
        return key, words[value.lower()]
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec, e.g. mobilenet_v2, shapes.pt, pkg.mod:factory")
    p.add_argument("--weights", help="weights file (a state dict) for the model")
    p.add_argument("--adapter", help="adapter name (default: the first that matches the model)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("-O", "--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="adapter option, e.g. -O conf=0.4 for a detector (repeatable)")
    p.add_argument("--conf", type=float, help="detection confidence threshold (detectors)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (detectors)")
    p.add_argument("--imgsz", type=int, help="model input size (detectors)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camframe", description="Class activation maps for PyTorch vision "
                                     "models: detectors box by box and class by class, classifiers too.")
    parser.add_argument("--version", action="version", version=f"camframe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("explain", help="explain images: maps, overlays, guided images, manifest")
    p.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    _model_args(p)
    p.add_argument("--layers", nargs="+", help="target layers (dotted names); default: the adapter's")
    p.add_argument("--method", help="weighting method (default: the adapter's, e.g. elementwise)")
    p.add_argument("--aggregate", choices=AGGREGATES, help="combine layers by max or avg (default: adapter's)")
    p.add_argument("--classes", help="comma-separated class names or ids (default: top-1 / each box's class)")
    p.add_argument("--boxes", default="all", help="detector boxes to explain: all, top:K or i,j,... (default: all)")
    p.add_argument("--guided", action=argparse.BooleanOptionalAction, default=None,
                   help="write guided backprop / guided Grad-CAM images (default: adapter's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--save-maps", action="store_true", help="also write each map as float32 .npy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report", action="store_true", help="also write a browsable index.html")
    p.add_argument("--out", required=True, type=Path, help="output directory")

    p = sub.add_parser("evaluate", help="score methods x layer sets x aggregations against ground-truth boxes")
    p.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    _model_args(p)
    p.add_argument("--labels", type=Path, help="COCO JSON or folder of YOLO .txt labels "
                   "(default: a .txt beside each image, or labels/ beside images/)")
    p.add_argument("--methods", help="comma-separated methods (default: the adapter's)")
    p.add_argument("--layer-sets", nargs="+", default=["default"], metavar="SET",
                   help="layer sets: default, a preset (e.g. neck), or comma-separated layer names")
    p.add_argument("--aggregates", default="max,avg", help="comma-separated aggregations (default: max,avg)")
    p.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default: 20)")
    p.add_argument("--fill", default="blur", choices=("blur", "mean", "noise", "zero"),
                   help="what deleted pixels become (default: blur)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report", action="store_true", help="also write index.html with the first configuration's maps")
    p.add_argument("--out", required=True, type=Path, help="output directory (a rerun resumes)")

    p = sub.add_parser("layers", help="list candidate layers with their output shapes")
    _model_args(p)

    sub.add_parser("plugins", help="list installed plugins, their versions and hooks")
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(args.option)
    for key in ("conf", "iou", "imgsz"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def _explainer(args: argparse.Namespace, **kwargs: Any) -> Explainer:
    model = _plugins.load_model(args.model, args.weights, args.device)
    return Explainer(model, adapter=args.adapter, options=_options(args), **kwargs)


def _boxes(text: str) -> Any:
    if text == "all" or text.startswith("top:"):
        if text.startswith("top:") and not text[4:].isdigit():
            raise CamframeError(f"--boxes {text!r}: expected top:K with a whole number K")
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise CamframeError(f"--boxes {text!r}: expected all, top:K or comma-separated indices") from None


def explain(args: argparse.Namespace) -> int:
    paths = _inputs(args.images)
    if args.batch_size < 1:
        raise CamframeError("--batch-size must be at least 1")
    ex = _explainer(args, layers=args.layers, method=args.method, aggregate=args.aggregate, guided=args.guided)
    classes = None
    if args.classes:
        classes = ex.adapter.resolve_classes([c.strip() for c in args.classes.split(",") if c.strip()], ex.model)
    boxes = _boxes(args.boxes)
    with OutputDir(args.out) as out:
        manifest = _explain_into(out, ex, paths, classes, boxes, args.batch_size, args.save_maps, args.quiet)
        manifest["model"] = args.model
        out.json("manifest.json", manifest)
        if args.report:
            out.text("index.html", render(manifest, title=f"camframe: {args.model}"))
    n = sum(len(e["explanations"]) for e in manifest["images"])
    where = "index.html" if args.report else "manifest.json"
    print(f"wrote {n} explanation(s) of {len(paths)} image(s) to {args.out}/ (see {where})")
    return 0


def _inputs(items: Sequence[str]) -> list[Path]:
    paths = expand_inputs(items)
    for path in paths:  # decode every input before anything is written
        load_image(path)
    return paths


def _explain_into(out: OutputDir, ex: Explainer, paths: Sequence[Path], classes: list[int] | None, boxes: Any,
                  batch_size: int, save_maps: bool, quiet: bool) -> dict[str, Any]:
    used: set[str] = set()
    entries = []
    with ex, tqdm(total=len(paths), unit="image", disable=quiet or None, file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start:start + batch_size]
            images = [load_image(p) for p in batch]
            result = ex(images, target=classes, boxes=boxes)
            for i, (path, image) in enumerate(zip(batch, images)):
                stem, n = path.stem, 1
                while stem in used:  # same name from another folder: x, x-2, x-3...
                    n += 1
                    stem = f"{path.stem}-{n}"
                used.add(stem)
                several = bool(classes) and len(classes) > 1
                entries.append(_write_image(out, save_maps, ex, result, i, path, image, stem, several))
            bar.update(len(batch))
    return {"camframe": __version__, "adapter": ex.adapter.name, "method": ex.method_name,
            "layers": list(ex.layers), "aggregate": ex.aggregate, "images": entries}


def evaluate(args: argparse.Namespace) -> int:
    paths = _inputs(args.images)
    model = _plugins.load_model(args.model, args.weights, args.device)
    split = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
    probe_ex = Explainer(model, adapter=args.adapter, options=_options(args), guided=False)
    grid = configs(split(args.methods or probe_ex.method_name), args.layer_sets, split(args.aggregates))
    # built (and so checked) before any work starts
    explainers = {c.key: c.explainer(model, args.adapter, _options(args)) for c in grid}
    truth = TruthSource(args.labels, probe_ex.adapter.class_names(probe_ex.model))
    out = OutputDir(args.out)
    log = args.out / "evaluation.jsonl"
    with tqdm(total=len(grid) * len(paths), unit="run", disable=args.quiet or None, file=sys.stderr) as bar:
        records = list(run_evaluation(explainers, paths, truth, log, steps=args.steps, fill=args.fill,
                                      progress=bar))
    table = summarise(records)
    markdown = table_markdown(table)
    with out:
        out.text("results.md", markdown)
        out.text("results.csv", table_csv(table))
        if args.report:
            manifest = _explain_into(out, explainers[grid[0].key], paths, None, "all", 8, False, True)
            manifest["model"] = args.model
            out.json("manifest.json", manifest)
            out.text("index.html", render(manifest, table_html(markdown), title=f"camframe evaluate: {args.model}"))
    print(markdown)
    print(f"wrote results.md, results.csv{', index.html' if args.report else ''} to {args.out}/")
    return 0


def _write_image(out: OutputDir, save_maps: bool, ex: Explainer, result: Result, index: int, path: Path,
                 image: np.ndarray, stem: str, several_classes: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": str(path), "size": list(image.shape[:2]), "explanations": []}
    rows = [u for u, t in enumerate(result.targets) if t.image == index]
    detections = result.detections[index] if result.detections is not None else None
    if detections is not None:
        entry["detections"] = [{"box": [round(v, 2) for v in d.box], "class_id": d.class_id,
                                "class_name": d.class_name, "score": round(d.score, 5), "index": d.index,
                                **d.extra} for d in detections]
        labels = [f"{k}: {d.class_name} {d.score:.2f}" for k, d in enumerate(detections)]
        entry["overview"] = out.image(f"{stem}.detections.jpg", draw_boxes(image, detections, labels))
        if not detections:
            tqdm.write(f"{path}: no detections above the confidence threshold", file=sys.stderr)
    if not rows:
        return entry
    idx = torch.tensor(rows)
    maps = result.original(result.maps[idx], rows)
    guided = result.original(result.guided[idx], rows) if result.guided is not None else None
    for j, u in enumerate(rows):
        t = result.targets[u]
        name = stem
        if t.box is not None:
            name += f".box{t.box}.{slug(t.class_name)}"
        elif several_classes:
            name += f".{slug(t.class_name)}"
        heat = maps[j].clamp(0, 1).cpu().numpy()
        picture = overlay(image, heat)
        if t.detection is not None:
            picture = draw_boxes(picture, [t.detection])
        files = {"cam": out.image(f"{name}.cam.jpg", picture)}
        if guided is not None:
            g = guided[j].cpu().numpy()
            files["guided-backprop"] = out.image(f"{name}.guided-backprop.jpg", gradient_image(g))
            files["guided-gradcam"] = out.image(f"{name}.guided-gradcam.jpg", gradient_image(g * heat[None]))
        if save_maps:
            files["map"] = out.array(f"{name}.cam.npy", heat)
        entry["explanations"].append({
            "class_id": t.class_id, "class_name": t.class_name, "score": round(t.score, 5), "box": t.box,
            "method": result.method, "layers": list(ex.layers), "aggregate": result.aggregate, "files": files})
    return entry


def layers(args: argparse.Namespace) -> int:
    ex = _explainer(args, guided=False)
    defaults = set(ex.layers)
    shapes = probe(ex.model, ex.adapter.example_input(ex.model))
    modules = dict(ex.model.named_modules())
    width = max((len(n) for n in shapes), default=10)
    for name, shape in shapes.items():
        if name:
            mark = "*" if name in defaults else " "
            print(f"{mark} {name:<{width}}  {type(modules[name]).__name__:<22} {tuple(shape)}")
    print(f"* default layers of adapter {ex.adapter.name!r} (aggregate: {ex.adapter.aggregate})")
    return 0


def plugins(args: argparse.Namespace) -> int:
    for info in _plugins.plugins_info():
        print(f"{info['name']:<20} {info['distribution']} {info['version']:<10} hooks: {', '.join(info['hooks'])}")
    print("adapters:", ", ".join(a.name for a in _plugins.adapters()))
    print("methods:", ", ".join(_plugins.methods()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("default", message="camframe plugin")
    try:
        commands = {"explain": explain, "evaluate": evaluate, "layers": layers, "plugins": plugins}
        return commands[args.command](args)
    except CamframeError as exc:
        print(f"camframe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("camframe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
