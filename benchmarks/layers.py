"""Which neck layers the YOLO default needs: each layer set against the default on the same boxes.

    python benchmarks/layers.py [--images 100] [--steps 5]   # writes <!-- neck-layers --> in docs/evaluation.md

The neck (the default) splits into the head inputs, the top-down blocks before the first head input
and the stride-2 convs between the head inputs. For the shapes detector (held-out images) and the COCO
YOLO11n and YOLO11n-seg (the real photos), every combination with the head inputs, by max and avg on
the common scale, is scored per box; each cell gives the mean and the paired difference from the
default on the same boxes with its 95 % interval, which separates configurations that the unpaired
intervals of the main tables cannot.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import camframe
from camframe._evaluate import Config, Curves, summarise

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402
import evaluate  # noqa: E402
from _baselines import write_section  # noqa: E402
from camframe_ultralytics import YOLOAdapter  # noqa: E402

METRICS = ("ebpg", *_evidence.CURVE_METRICS)
DEFAULT = f"{evaluate.YOLO_DEFAULT.layers} | {evaluate.YOLO_DEFAULT.aggregate}"  # the adapter's default (elementwise)


def layer_sets(model: torch.nn.Module) -> dict[str, str]:
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


def cell(entry: tuple, diff: tuple, metric: str) -> str:
    """``mean (Δ ± h)``, the difference in bold where its interval excludes 0."""
    mean, low, high, n = diff
    text = f"{mean:+.3f} ± {(high - low) / 2:.3f}"
    if n > 1 and (low > 0 or high < 0):
        text = f"**{text}**" + (" better" if _evidence._better(metric, mean, 0.0) else " worse")
    return f"{entry:.3f} ({text})"


def section(name: str, model: torch.nn.Module, data: list, curves: Curves) -> str:
    """One model's table: every layer set by max and avg, against the default on the same boxes."""
    sets, records, rows = layer_sets(model), [], []
    for label, layers in sets.items():
        for aggregate in ("max-common", "avg-common"):
            key = f"{label} | {aggregate}"
            start = time.perf_counter()
            records += _evidence.records(Config("elementwise", layers, aggregate).explainer(model), key, data, curves)
            print(f"  {name}: {key}: {time.perf_counter() - start:.1f} s", flush=True)
    for e in summarise(records):
        diffs = _evidence.paired(records, e["config"], DEFAULT, METRICS)
        cells = [f"{e[m][0]:.3f}" if e["config"] == DEFAULT else cell(e[m][0], diffs[m], m) for m in METRICS]
        rows.append(f"| {e['config'].replace(' | ', ' · ')} | {e['matched']} | " + " | ".join(cells) + " |")
    layers = "; ".join(f"{label}: `{value}`" for label, value in sets.items() if label != "neck")
    head = ["layers · aggregate", "matched", "EBPG ↑", "deletion ↓ (blur)", "insertion ↑ (blur)",
            "deletion ↓ (mean)", "insertion ↑ (mean)"]
    return (f"#### {name}\n\n{layers}.\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
            + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="held-out shapes images (default 100)")
    parser.add_argument("--steps", type=int, default=5, help="deletion/insertion steps (default 5)")
    parser.add_argument("--out", type=Path, default=evaluate.ROOT / "docs" / "evaluation.md")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("CAMFRAME_CACHE")
                                                           or evaluate.ROOT / ".cache"))
    parser.add_argument("--photos", type=int, help="only the first PHOTOS real photos (default: all)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    curves, start = Curves(steps=args.steps), time.perf_counter()
    model = camframe.load_model(str(evaluate.ROOT / "tests" / "assets" / "shapes_yolo.pt"), device=args.device)
    parts = [section(f"Synthetic shapes detector, {args.images} held-out images", model,
                     evaluate.heldout(args.images), curves)]
    photos, checkpoints = _evidence.real_photo_paths(args.cache)[:args.photos], _evidence.yolo_checkpoints(args.cache)
    for name in ("yolo11n", "yolo11n-seg"):
        model = camframe.load_model(str(checkpoints[name]), device=args.device)
        parts.append(section(f"Real photos, COCO {name} ({len(photos)} photos)", model,
                             _evidence.yolo_data(model, photos), curves))
    photos_arg = f" --photos {args.photos}" if args.photos else ""
    text = (f"Generated by `python benchmarks/layers.py --images {args.images} --steps {args.steps} --device "
            f"{args.device}{photos_arg}` in {time.perf_counter() - start:.0f} s ({evaluate.where(args.device)}). "
            "Elementwise maps; each cell is the mean over the matched boxes and, in brackets, the paired "
            f"difference from the default (`{DEFAULT.replace(' | ', ' · ')}`) on the same boxes with the half-width "
            "of its 95 % interval, in bold with better/worse where that interval excludes 0.\n\n" + "\n".join(parts))
    write_section(args.out, "neck-layers", text)
    print(text)


if __name__ == "__main__":
    main()
