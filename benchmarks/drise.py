"""D-RISE beside the gradient maps, on the held-out shapes set; results into docs/drise.md.

    python benchmarks/drise.py [--images 8] [--masks 500] [--steps 10] [--out docs/drise.md]

Per box: camframe's ``drise`` (seeded, bilinear shifted masks, adapter fill), the YOLO default
(``elementwise`` over the neck), and ``vision-explanation-methods``' own ``DRISE_saliency`` with its
own masks (nearest-neighbour upsampled grids, image x mask, min-max of the signed map) over the
same detections, scored like ``benchmarks/evaluate.py`` (pointing, EBPG, discrimination,
deletion/insertion with the box schedule), with seconds per image. Other benchmarks call
``drise_records``.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import time
from pathlib import Path
from typing import Any

import torch

import camframe
from camframe.core.aggregate import upsample
from camframe.evaluation.harness import Config, Curves, summarise, table_markdown

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("camframe_benchmark_evaluate", ROOT / "benchmarks" / "evaluate.py")
bench = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(bench)  # type: ignore[union-attr]
YOLO = ROOT / "tests" / "assets" / "shapes_yolo.pt"


def drise_records(model: Any, data: list, curves: Curves, masks: int = 1000, options: dict | None = None,
                  **method_options: Any) -> list[dict]:
    """Per-box records (as ``benchmarks/evaluate.py``'s ``_records``) of camframe's ``drise``."""
    config = Config("drise", "default", "max")
    ex = config.explainer(model, options=options, method_options={"masks": masks, **method_options})
    return bench._records(ex, f"camframe drise ({masks} masks)", data, curves)


def reference_maps(masks: int) -> bench.Maps:
    """``vision-explanation-methods``' D-RISE on the explainer's detections: one map per target."""
    from vision_explanation_methods.explanations import common
    from vision_explanation_methods.explanations import drise as reference

    def record(dets: list) -> Any:
        return common.DetectionRecord(torch.tensor([d.box for d in dets]), torch.ones(len(dets)),
                                      torch.stack([d.probs for d in dets]))

    def maps(ex: camframe.Explainer, result: Any) -> torch.Tensor:
        adapter, model = ex.adapter, ex.model

        class Wrapped(common.GeneralObjectDetectionModelWrapper):
            def predict(self, x: torch.Tensor) -> list:
                found = adapter.detect(model(x), result.metas * len(x), model, conf=adapter.rescore_threshold())
                return [record(dets) for dets in found]

        torch.manual_seed(0)
        with torch.no_grad():
            out = reference.DRISE_saliency(Wrapped(), result.inputs, [record([t.detection for t in result.targets])],
                                           masks, device=str(result.inputs.device))[0]
        return upsample(torch.stack([m["detection"][0] for m in out]), tuple(result.inputs.shape[-2:]))

    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="held-out shapes images")
    parser.add_argument("--masks", type=int, default=500, help="masks per image, for both D-RISEs")
    parser.add_argument("--steps", type=int, default=10, help="deletion/insertion steps")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "drise.md")
    args = parser.parse_args()
    curves = Curves(args.steps, ("blur", "mean"), "box")
    model = camframe.load_model(str(YOLO))
    data = bench.heldout(args.images)
    start = time.perf_counter()
    records = bench._records(camframe.Explainer(model, guided=False), "camframe default (elementwise, neck, avg)",
                             data, curves)
    records += drise_records(model, data, curves, args.masks)
    records += bench._records(camframe.Explainer(model, guided=False),
                              f"vision-explanation-methods DRISE_saliency ({args.masks} masks)", data, curves,
                              reference_maps(args.masks))
    table = table_markdown(summarise(records))
    text = (f"The shapes detector (`tests/assets/shapes_yolo.pt`) on {args.images} held-out images, every "
            f"detected box, {args.masks} masks for each D-RISE, deletion/insertion in {args.steps} steps "
            f"(box schedule). Measured by `python benchmarks/drise.py --images {args.images} --masks "
            f"{args.masks} --steps {args.steps}` on {platform.machine()} CPU "
            f"({torch.get_num_threads()} threads, a shared machine: seconds are indicative), "
            f"in {time.perf_counter() - start:.0f} s.\n\n{table}")
    print(text)
    bench.write_section(args.out, "drise-benchmark", text)


if __name__ == "__main__":
    main()
