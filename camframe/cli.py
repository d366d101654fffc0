"""The ``camframe`` command: ``explain``, ``evaluate``, ``layers``, ``plugins``."""

from __future__ import annotations

import argparse
import functools
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from camframe import __version__
from camframe.plugins import manager as _plugins
from camframe.core import validate as _validate
from camframe.adapters.base import probe
from camframe.core.aggregate import AGGREGATES, NORMALISATIONS
from camframe.adapters.detector import select_boxes
from camframe.core.errors import CamframeError, Terminated, interrupted, terminate
from camframe.evaluation.harness import FILLS, SCHEDULES, Curves, configs, summarise, table_csv, table_markdown
from camframe.evaluation.harness import evaluate as run_evaluation
from camframe.engine.explainer import Explainer
from camframe.core.images import MAX_PIXELS, pixel_limit
from camframe.output.folder import OutputDir
from camframe.output.outcomes import Request
from camframe.output.pipeline import default_workers
from camframe.output.report import render, table_html
from camframe.core.truth import TruthSource
from camframe.output.writer import _explain_into, _inputs, _write

__all__ = ["main", "build_parser"]

PRESETS_HELP = "such as neck or backbone, which adapters name for themselves"


def _option(text: str) -> tuple[str, str]:
    """``KEY=VALUE``; the adapter's declared option type converts the text (``_validate.option_values``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _out_folder(text: str) -> Path:
    """``--out``: an empty one (``--out ""``, an unset variable) would be the current folder: refused."""
    if not text.strip():
        raise CamframeError("--out is empty; name the output folder (--out . for the current one)")
    return Path(text)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec, e.g. mobilenet_v2, shapes.pt, pkg.mod:factory")
    p.add_argument("--weights", help="weights file (a state dict) for the model")
    p.add_argument("--unsafe-load", action="store_true", help="load a pickled checkpoint in full, which runs any "
                   "code it holds: only for files you trust (default: torch's weights-only unpickler)")
    p.add_argument("--adapter", help="adapter name (default: the first that matches the model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto, the first "
                   "of cuda, mps and cpu this machine has)")
    p.add_argument("-O", "--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="adapter option, e.g. -O conf=0.4 for a detector (repeatable)")
    for name, (text, owners) in _adapter_flags().items():
        try:
            p.add_argument(f"--{name}", dest=name, metavar=name.upper(),
                           help=f"{text} (adapter option {name}: {', '.join(owners)})")
        except argparse.ArgumentError:  # an adapter may not redefine camframe's own flags
            continue


def _workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"processes that decode and preprocess images ahead of the model; 0: none, all in one "
                   f"process (default here: {default_workers('cuda')} for a model on a GPU, "
                   f"{default_workers('cpu')} on the CPU)")


def _adapter_flags() -> dict[str, tuple[str, list[str]]]:
    """The ``--NAME`` flags the installed adapters declare (``cli_options``): help, adapter names."""
    flags: dict[str, tuple[str, list[str]]] = {}
    for adapter in _plugins.adapters():
        for name, text in adapter.cli_options.items():
            flags.setdefault(name, (text, []))[1].append(adapter.name)
    return flags


def _error_args(p: argparse.ArgumentParser) -> None:
    """Explaining a detector's errors (docs/explaining-errors.md)."""
    p.add_argument("--labels", nargs="?", const="", metavar="LABELS", help="ground truth (a COCO .json or a folder "
                   "of YOLO .txt; no value: the .txt beside each image): detections marked tp/fp, missed objects "
                   "explained through the model's best candidate")
    p.add_argument("--match-iou", type=float, default=0.5, metavar="IOU",
                   help="IoU at which a detection matches a ground-truth object of its class (default: 0.5)")
    p.add_argument("--box", action="append", metavar="X1,Y1,X2,Y2[:CLASS]", help="explain the model's best "
                   "candidate for this box, original pixels (repeatable; or a file of such lines)")
    p.add_argument("--contrast", metavar="CLASS", help="explain each target's class minus CLASS for the same box")


def _drise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--masks", type=int, help="drise: random masks per image (default: 1000)")
    p.add_argument("--seed", type=int, help="drise: seed of the masks (default: 0)")
    p.add_argument("--mask-batch", type=int, help="drise: masked images per forward pass (default: 32)")


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
    p.add_argument("--layers", nargs="+", help=f"target layers: dotted module names, or a preset of the adapter "
                   f"({PRESETS_HELP}); `camframe layers --model M` lists a model's layers and presets "
                   "(default: the adapter's)")
    p.add_argument("--method", help=f"weighting method: {', '.join(_plugins.method_listing())} "
                   "(default: the adapter's, e.g. elementwise)")
    _drise_args(p)
    p.add_argument("--aggregate", choices=AGGREGATES, help="combine layers by max or avg (default: adapter's)")
    p.add_argument("--normalise", choices=NORMALISATIONS, help="put layers on one scale before combining them: "
                   "common (densities per input pixel, normalised once after aggregation) or layer (each "
                   "layer min-max normalised first, as pytorch-grad-cam) (default: adapter's)")
    p.add_argument("--smooth", help="smooth the maps: tta (flips and zooms, averaged), eigen (first principal "
                   "component of the weighted activations) or noise:N[:SIGMA[:SEED]] (SmoothGrad over N noisy "
                   "copies; SIGMA a share of the input's range, default 0.15) (default: none)")
    p.add_argument("--classes", help="comma-separated class names or ids (default: top-1 / each box's class)")
    p.add_argument("--boxes", help="detector boxes to explain: all, top:K or i,j,... (default: all; detectors only)")
    _error_args(p)
    p.add_argument("--guided", action=argparse.BooleanOptionalAction, default=None,
                   help="write guided backprop / guided Grad-CAM images (default: adapter's)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: 8; on the CPU the adapter's "
                   "cpu_batch_size: 1 for detectors, whose rounds of box targets each take a backward over the batch)")
    _workers_arg(p)
    p.add_argument("--half", action="store_true", help="mixed precision on a GPU: bfloat16 (else float16) autocast "
                   "for the forward passes, maps in float32; refused on the CPU")
    p.add_argument("--no-group", dest="group", action="store_false", help="one backward pass per box, not one "
                   "per group of boxes whose gradients cannot meet (the same maps; for timing comparisons)")
    p.add_argument("--save-maps", action="store_true", help="also write each map as float32 .npy")
    p.add_argument("--profile", action="store_true", help="print where the time went (wall seconds per stage: "
                   "reading, forward, support windows, backward passes and how many, maps, writing) to stderr")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report", action="store_true", help="also write a browsable index.html")
    p.add_argument("--out", required=True, type=_out_folder, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace files in --out that no camframe run wrote")
    p.add_argument("--resume", action="store_true", help="journal each finished image, so that an interrupted "
                   "run continues where it stopped when rerun with --resume (see docs/reliability.md)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="explain on a Ray cluster "
                   "(auto, an address, or none for a local one; needs camframe[ray]; see docs/scale.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="with --ray: show Ray's own logs and progress")

    p = sub.add_parser("evaluate", help="score methods x layer sets x aggregations against ground-truth boxes")
    p.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse images of more than N pixels, width x height (default: {MAX_PIXELS:,})")
    _model_args(p)
    p.add_argument("--labels", type=Path, help="COCO JSON or folder of YOLO .txt labels "
                   "(default: a .txt beside each image, or labels/ beside images/)")
    p.add_argument("--methods", help=f"comma-separated methods, of {', '.join(_plugins.method_listing())} "
                   "(default: the adapter's)")
    _drise_args(p)
    p.add_argument("--layer-sets", nargs="+", default=["default"], metavar="SET",
                   help=f"layer sets: default, a preset ({PRESETS_HELP}), or comma-separated layer names; "
                   "`camframe layers --model M` lists a model's presets")
    p.add_argument("--aggregates", default="max,avg", help="comma-separated aggregations: max or avg, each "
                   "optionally with -common or -layer for the normalisation, e.g. max-common,avg-layer "
                   "(default: max,avg with the adapter's normalisation)")
    p.add_argument("--smooth", default="none", help="comma-separated smoothings to compare: none, tta, eigen, "
                   "noise:N[:SIGMA[:SEED]] (default: none)")
    p.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default: 20)")
    p.add_argument("--schedule", default="box", help=f"{' or '.join(SCHEDULES)}: deletion/insertion steps in units "
                   "of the target box's area, or of the whole image (default: box)")
    p.add_argument("--extent", type=float, default=2.0,
                   help="box areas perturbed at the last step, with --schedule box (default: 2)")
    _workers_arg(p)
    p.add_argument("--fill", default="blur,mean", help="what deleted pixels become, comma-separated: "
                   f"{', '.join(FILLS)} (default: blur,mean; each gives its own curves)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report", action="store_true", help="also write index.html with the first configuration's maps")
    p.add_argument("--out", required=True, type=_out_folder, help="output directory (a rerun resumes)")
    p.add_argument("--overwrite", action="store_true", help="replace files in --out that no camframe run wrote")

    p = sub.add_parser("layers", help="list candidate layers with their output shapes, and the adapter's presets")
    _model_args(p)
    p.add_argument("pattern", nargs="?", help="only layers whose name or type matches this regular expression "
                   "(case-insensitive), e.g. Conv2d or ^backbone")
    p.add_argument("--depth", type=int, metavar="N", help="only layers at most N levels deep (model.22 is level 2)")
    p.add_argument("--defaults", action="store_true", help="only the adapter's default layers")

    sub.add_parser("plugins", help="list installed plugins, their versions and hooks")
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """``-O`` options and adapter flags (the flags win); the adapter refuses any it does not take."""
    options = dict(args.option)
    for key in _adapter_flags():
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    return options


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--masks``, ``--seed`` and ``--mask-batch`` where given: a black-box method's options."""
    return {k: getattr(args, k) for k in ("masks", "seed", "mask_batch") if getattr(args, k) is not None}


def _explainer(args: argparse.Namespace, **kwargs: Any) -> Explainer:
    model = _plugins.load_model(args.model, args.weights, args.device, args.unsafe_load)
    return Explainer(model, adapter=args.adapter, options=_options(args), **kwargs)


def explain(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.profile and args.ray is not None:
        raise CamframeError("--profile times a local run: it does not apply to --ray")
    on_ray = _ray_entry() if args.ray is not None else None
    paths = _inputs(args.images, args.workers)
    if args.batch_size is not None and args.batch_size < 1:
        raise CamframeError("--batch-size must be at least 1")
    loading = time.perf_counter()
    ex = _explainer(args, layers=args.layers, method=args.method, aggregate=args.aggregate, guided=args.guided,
                    normalise=args.normalise, half=args.half, smooth=args.smooth, group=args.group,
                    method_options=_method_options(args), profile=args.profile)
    ex.profile.add("loading the model", time.perf_counter() - loading)
    classes = None
    if args.classes is not None:
        wanted = [c.strip() for c in args.classes.split(",") if c.strip()]
        classes = _validate.class_ids(wanted, ex.adapter, ex.model)
    boxes = select_boxes(ex.adapter, args.boxes)
    request = Request(ex, args.labels, args.box, args.contrast, args.match_iou)
    if request and on_ray is not None:
        raise CamframeError("--labels, --box and --contrast do not run on --ray yet")
    elsewhere = None
    if on_ray is not None:
        elsewhere = functools.partial(on_ray, ex=ex, paths=paths, classes=classes, boxes=boxes, address=args.ray,
                                      model=args.model, weights=args.weights, save_maps=args.save_maps,
                                      device=args.device, batch_size=args.batch_size, verbose=args.verbose,
                                      quiet=args.quiet)
    manifest = _write(ex, paths, args.out, args.model, classes, boxes, args.save_maps, args.report, args.overwrite,
                      args.resume, args.batch_size, args.workers, args.quiet, elsewhere, request or None)
    n = sum(len(e["explanations"]) for e in manifest["images"])
    where = "index.html" if args.report else "manifest.json"
    print(f"wrote {n} explanation(s) of {len(paths)} image(s) to {args.out}/ (see {where})")
    if args.profile:
        print(f"camframe: profile of {len(paths)} image(s), wall seconds per stage:\n"
              f"{ex.profile.table(time.perf_counter() - start)}", file=sys.stderr)
    return 0


def _ray_entry() -> Any:
    """``camframe.ray.explain_into``; a one-line error where Ray is not installed."""
    try:
        from camframe.ray import explain_into
    except ImportError:
        raise CamframeError('--ray needs Ray Data: pip install "camframe[ray]"') from None
    return explain_into


def evaluate(args: argparse.Namespace) -> int:
    split = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
    curves = Curves(args.steps, tuple(dict.fromkeys(split(args.fill))), args.schedule, args.extent)
    paths = _inputs(args.images, args.workers)
    model = _plugins.load_model(args.model, args.weights, args.device, args.unsafe_load)
    probe_ex = Explainer(model, adapter=args.adapter, options=_options(args), guided=False)
    grid = configs(split(args.methods or probe_ex.method_name), args.layer_sets, split(args.aggregates),
                   split(args.smooth))
    # built (and so checked) before any work starts
    explainers = {c.key: c.explainer(model, args.adapter, _options(args), _method_options(args)) for c in grid}
    truth = TruthSource(args.labels, probe_ex.adapter.class_names(probe_ex.model))
    with OutputDir(args.out, args.overwrite) as out:  # the resume log is appended in place, under the lock
        with tqdm(total=len(grid) * len(paths), unit="run", disable=args.quiet or None, file=sys.stderr) as bar:
            records = list(run_evaluation(explainers, paths, truth, out.live("evaluation.jsonl"), curves=curves,
                                          progress=bar, workers=args.workers))
        table = summarise(records)
        markdown = table_markdown(table)
        out.text("results.md", markdown)
        out.text("results.csv", table_csv(table))
        if args.report:
            manifest = _explain_into(out, explainers[grid[0].key], paths, None, None, None, False, True, args.workers)
            manifest["model"] = args.model
            out.json("manifest.json", manifest)
            out.text("index.html", render(manifest, table_html(markdown), title=f"camframe evaluate: {args.model}"))
    print(markdown)
    print(f"wrote results.md, results.csv{', index.html' if args.report else ''} to {args.out}/")
    return 0


def layers(args: argparse.Namespace) -> int:
    if args.depth is not None and args.depth < 1:
        raise CamframeError(f"--depth must be >= 1, got {args.depth}")
    try:
        pattern = re.compile(args.pattern or "", re.IGNORECASE)
    except re.error as e:
        raise CamframeError(f"layer pattern {args.pattern!r} is not a regular expression: {e}") from None
    ex = _explainer(args, guided=False)
    defaults = set(ex.layers)
    shapes = probe(ex.model, ex.adapter.example_input(ex.model))
    modules = dict(ex.model.named_modules())
    shown = [name for name in shapes if name and (not args.defaults or name in defaults)
             and (args.depth is None or name.count(".") < args.depth)
             and (pattern.search(name) or pattern.search(type(modules[name]).__name__))]
    width = max((len(n) for n in shown), default=10)
    for name in shown:
        mark = "*" if name in defaults else " "
        print(f"{mark} {name:<{width}}  {type(modules[name]).__name__:<22} {tuple(shapes[name])}")
    if len(shown) < len(shapes) - ("" in shapes):
        print(f"({len(shown)} of {len(shapes) - ('' in shapes)} layers shown)")
    for preset, names in ex.adapter.layer_presets(ex.model).items():
        print(f"preset {preset}: {', '.join(names)}")
    print(f"* default layers of adapter {ex.adapter.name!r} (aggregate: {ex.adapter.aggregate})")
    return 0


def plugins(args: argparse.Namespace) -> int:
    for info in _plugins.plugins_info():
        print(f"{info['name']:<20} {info['distribution']} {info['version']:<10} hooks: {', '.join(info['hooks'])}")
    print("adapters:", ", ".join(a.name for a in _plugins.adapters()))
    print("methods:", ", ".join(_plugins.method_listing()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("default", message="camframe plugin")
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if on_main else None
    try:
        args = build_parser().parse_args(argv)  # a CamframeError from a flag's check is one line too
        commands = {"explain": explain, "evaluate": evaluate, "layers": layers, "plugins": plugins}
        with pixel_limit(getattr(args, "max_pixels", MAX_PIXELS)):  # what load_image accepts, for this run
            return commands[args.command](args)
    except CamframeError as exc:
        print(f"camframe: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        return interrupted(exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
