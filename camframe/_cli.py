"""The ``camframe`` command: ``explain``, ``evaluate``, ``layers``, ``plugins``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from . import __version__, _plugins, _validate
from ._adapter import probe
from ._aggregate import AGGREGATES
from ._detector import Boxes, select_boxes
from ._errors import CamframeError
from ._evaluate import FILLS, SCHEDULES, Curves, configs, summarise, table_csv, table_markdown
from ._evaluate import evaluate as run_evaluation
from ._explainer import Explainer, Result
from ._images import MAX_PIXELS, expand_inputs, load_image, pixel_limit
from ._output import OutputDir, slug
from ._render import draw_boxes, gradient_image, overlay
from ._report import render, table_html
from ._truth import TruthSource

__all__ = ["main", "build_parser"]


def _option(text: str) -> tuple[str, str]:
    """``KEY=VALUE``; the adapter's declared option type converts the text (``_validate.option_values``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec, e.g. mobilenet_v2, shapes.pt, pkg.mod:factory")
    p.add_argument("--weights", help="weights file (a state dict) for the model")
    p.add_argument("--adapter", help="adapter name (default: the first that matches the model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument("-O", "--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="adapter option, e.g. -O conf=0.4 for a detector (repeatable)")
    for name, (text, owners) in _adapter_flags().items():
        try:
            p.add_argument(f"--{name}", dest=name, metavar=name.upper(),
                           help=f"{text} (adapter option {name}: {', '.join(owners)})")
        except argparse.ArgumentError:  # an adapter may not redefine camframe's own flags
            continue


def _adapter_flags() -> dict[str, tuple[str, list[str]]]:
    """The ``--NAME`` flags the installed adapters declare (``cli_options``): help, adapter names."""
    flags: dict[str, tuple[str, list[str]]] = {}
    for adapter in _plugins.adapters():
        for name, text in adapter.cli_options.items():
            flags.setdefault(name, (text, []))[1].append(adapter.name)
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camframe", description="Class activation maps for PyTorch vision "
                                     "models: detectors box by box and class by class, classifiers too.")
    parser.add_argument("--version", action="version", version=f"camframe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("explain", help="explain images: maps, overlays, guided images, manifest")
    p.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse images of more than N pixels, width x height (default: {MAX_PIXELS:,})")
    _model_args(p)
    p.add_argument("--layers", nargs="+", help="target layers (dotted names); default: the adapter's")
    p.add_argument("--method", help="weighting method (default: the adapter's, e.g. elementwise)")
    p.add_argument("--aggregate", choices=AGGREGATES, help="combine layers by max or avg (default: adapter's)")
    p.add_argument("--classes", help="comma-separated class names or ids (default: top-1 / each box's class)")
    p.add_argument("--boxes", help="detector boxes to explain: all, top:K or i,j,... (default: all; detectors only)")
    p.add_argument("--guided", action=argparse.BooleanOptionalAction, default=None,
                   help="write guided backprop / guided Grad-CAM images (default: adapter's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--save-maps", action="store_true", help="also write each map as float32 .npy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report", action="store_true", help="also write a browsable index.html")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace files in --out that no camframe run wrote")

    p = sub.add_parser("evaluate", help="score methods x layer sets x aggregations against ground-truth boxes")
    p.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse images of more than N pixels, width x height (default: {MAX_PIXELS:,})")
    _model_args(p)
    p.add_argument("--labels", type=Path, help="COCO JSON or folder of YOLO .txt labels "
                   "(default: a .txt beside each image, or labels/ beside images/)")
    p.add_argument("--methods", help="comma-separated methods (default: the adapter's)")
    p.add_argument("--layer-sets", nargs="+", default=["default"], metavar="SET",
                   help="layer sets: default, a preset (e.g. neck), or comma-separated layer names")
    p.add_argument("--aggregates", default="max,avg", help="comma-separated aggregations (default: max,avg)")
    p.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default: 20)")
    p.add_argument("--schedule", default="box", help=f"{' or '.join(SCHEDULES)}: deletion/insertion steps in units "
                   "of the target box's area, or of the whole image (default: box)")
    p.add_argument("--extent", type=float, default=2.0,
                   help="box areas perturbed at the last step, with --schedule box (default: 2)")
    p.add_argument("--fill", default="blur,mean", help="what deleted pixels become, comma-separated: "
                   f"{', '.join(FILLS)} (default: blur,mean; each gives its own curves)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report", action="store_true", help="also write index.html with the first configuration's maps")
    p.add_argument("--out", required=True, type=Path, help="output directory (a rerun resumes)")
    p.add_argument("--overwrite", action="store_true", help="replace files in --out that no camframe run wrote")

    p = sub.add_parser("layers", help="list candidate layers with their output shapes")
    _model_args(p)

    sub.add_parser("plugins", help="list installed plugins, their versions and hooks")
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """``-O`` options and adapter flags (the flags win); the adapter refuses any it does not take."""
    options = dict(args.option)
    for key in _adapter_flags():
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    return options


def _explainer(args: argparse.Namespace, **kwargs: Any) -> Explainer:
    model = _plugins.load_model(args.model, args.weights, args.device)
    return Explainer(model, adapter=args.adapter, options=_options(args), **kwargs)


def explain(args: argparse.Namespace) -> int:
    paths = _inputs(args.images)
    if args.batch_size < 1:
        raise CamframeError("--batch-size must be at least 1")
    ex = _explainer(args, layers=args.layers, method=args.method, aggregate=args.aggregate, guided=args.guided)
    classes = None
    if args.classes is not None:
        wanted = [c.strip() for c in args.classes.split(",") if c.strip()]
        classes = _validate.class_ids(wanted, ex.adapter, ex.model)
    boxes = select_boxes(ex.adapter, args.boxes)
    with OutputDir(args.out, args.overwrite) as out:
        manifest = _explain_into(out, ex, paths, classes, boxes, args.batch_size, args.save_maps, args.quiet)
        if not any(e["explanations"] for e in manifest["images"]):
            raise CamframeError(_nothing_to_explain(manifest["images"], boxes))
        manifest["model"] = args.model
        out.json("manifest.json", manifest)
        if args.report:
            out.text("index.html", render(manifest, title=f"camframe: {args.model}"))
    n = sum(len(e["explanations"]) for e in manifest["images"])
    where = "index.html" if args.report else "manifest.json"
    print(f"wrote {n} explanation(s) of {len(paths)} image(s) to {args.out}/ (see {where})")
    return 0


def _nothing_to_explain(entries: list[dict[str, Any]], boxes: Boxes | None) -> str:
    """Why a run found no target in any image (run as it was, it would write nothing of use)."""
    found = sum(len(e.get("detections", [])) for e in entries)
    if boxes is None:
        why = "no target"
    elif not found:
        why = "no detections (a lower conf may find some)"
    else:
        why = f"--boxes {boxes} picks none of the {found} detection(s)"
    return f"nothing to explain: {why} in {len(entries)} image(s)"


def _inputs(items: Sequence[str]) -> list[Path]:
    paths = expand_inputs(items)
    for path in paths:  # decode every input before anything is written
        load_image(path)
    return paths


def _explain_into(out: OutputDir, ex: Explainer, paths: Sequence[Path], classes: list[int] | None,
                  boxes: Boxes | None, batch_size: int, save_maps: bool, quiet: bool) -> dict[str, Any]:
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
    split = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
    curves = Curves(args.steps, tuple(dict.fromkeys(split(args.fill))), args.schedule, args.extent)
    paths = _inputs(args.images)
    model = _plugins.load_model(args.model, args.weights, args.device)
    probe_ex = Explainer(model, adapter=args.adapter, options=_options(args), guided=False)
    grid = configs(split(args.methods or probe_ex.method_name), args.layer_sets, split(args.aggregates))
    # built (and so checked) before any work starts
    explainers = {c.key: c.explainer(model, args.adapter, _options(args)) for c in grid}
    truth = TruthSource(args.labels, probe_ex.adapter.class_names(probe_ex.model))
    with OutputDir(args.out, args.overwrite) as out:  # the resume log is appended in place, under the lock
        with tqdm(total=len(grid) * len(paths), unit="run", disable=args.quiet or None, file=sys.stderr) as bar:
            records = list(run_evaluation(explainers, paths, truth, out.live("evaluation.jsonl"), curves=curves,
                                          progress=bar))
        table = summarise(records)
        markdown = table_markdown(table)
        out.text("results.md", markdown)
        out.text("results.csv", table_csv(table))
        if args.report:
            manifest = _explain_into(out, explainers[grid[0].key], paths, None, None, 8, False, True)
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
    for u in rows:  # one target at a time: full-size buffers for one picture, however many targets
        t = result.targets[u]
        name = stem
        if t.box is not None:
            name += f".box{t.box}.{slug(t.class_name)}"
        elif several_classes:
            name += f".{slug(t.class_name)}"
        heat = result.original(result.maps[u][None], [u])[0].clamp(0, 1).cpu().numpy()
        picture = overlay(image, heat)
        if t.detection is not None:
            picture = draw_boxes(picture, [t.detection])
        files = {"cam": out.image(f"{name}.cam.jpg", picture)}
        if result.guided is not None:  # pictures made at input resolution, then mapped onto the original
            for kind, grads in (("guided-backprop", result.guided), ("guided-gradcam", result.guided_gradcam)):
                picture = gradient_image(grads[u], lambda g: result.original(g[None], [u])[0])
                files[kind] = out.image(f"{name}.{kind}.jpg", picture)
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
    print("methods:", ", ".join(_plugins.method_listing()))
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (``finally``, ``__exit__``) runs as for Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("default", message="camframe plugin")
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main else None
    try:
        commands = {"explain": explain, "evaluate": evaluate, "layers": layers, "plugins": plugins}
        with pixel_limit(getattr(args, "max_pixels", MAX_PIXELS)):  # what load_image accepts, for this run
            return commands[args.command](args)
    except CamframeError as exc:
        print(f"camframe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("camframe: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("camframe: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
