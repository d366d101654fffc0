"""Common-scale vs per-layer normalisation of multi-layer maps, on the held-out shapes set.

    python benchmarks/normalise.py [--images 24] [--steps 10] [--layer-sets neck]

For each layer set: ``elementwise`` with ``max`` and ``avg``, each with ``-common`` (densities per
input pixel, one normalisation after aggregation) and ``-layer`` (each layer min-max normalised
first, pytorch-grad-cam's way), scored like ``benchmarks/evaluate.py`` (box schedule, blur and mean
fills), plus the sanity check (Spearman ρ of the maps, trained vs head + last neck layers
re-initialised, same boxes). Prints one Markdown table per layer set.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

import camframe
from camframe import metrics
from camframe.evaluation.harness import Config, Curves, summarise, table_markdown

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("camframe_benchmark_evaluate", ROOT / "benchmarks" / "evaluate.py")
bench = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(bench)  # type: ignore[union-attr]

AGGREGATES = ("max-common", "max-layer", "avg-common", "avg-layer")


def sanity(model: torch.nn.Module, randomized: torch.nn.Module, data: list, config: Config) -> float:
    """Mean Spearman ρ between the maps of the trained and the re-initialised model, same boxes."""
    rhos = []
    for image, _ in data:
        trained = config.explainer(model)([image])
        ex = config.explainer(randomized, bench._CarriedOver(trained.detections))
        rhos.append(metrics.sanity_check(trained.maps, ex([image]).maps))
    return float(torch.cat(rhos).nanmean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layer-sets", nargs="+", default=["neck"])
    parser.add_argument("--sanity-images", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = camframe.load_model(str(ROOT / "tests" / "assets" / "shapes_yolo.pt"))
    randomized = metrics.randomize_layers(model, ["model.22", "model.21", "model.19"])
    data = bench.heldout(args.images)
    curves = Curves(steps=args.steps)
    start = time.perf_counter()
    for layers in args.layer_sets:
        records, rhos = [], {}
        for aggregate in AGGREGATES:
            config = Config("elementwise", layers, aggregate)
            records += bench._records(config.explainer(model), config.key, data, curves)
            rhos[config.key] = sanity(model, randomized, data[:args.sanity_images], config)
            print(f"  {config.key}: {time.perf_counter() - start:.0f} s", flush=True)
        print(f"\n{args.images} held-out shapes images, {args.steps} steps, layers {layers}\n")
        print(table_markdown(summarise(records)))
        print("| config | Spearman ρ (↓) |\n|---|---|")
        print("\n".join(f"| {k.replace(' | ', ' · ')} | {v:.3f} |" for k, v in rhos.items()))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
