"""Support grouping on a two-stage detector: Faster R-CNN's boxes, one backward each against grouped.

    python benchmarks/rcnn_grouped_speed.py [--repeats 3] [--boxes 30] [--size 640]

torchvision's Faster R-CNN ResNet-50 FPN with random weights (seed 0), its transform set to ``--size``
(shorter and longer side), on a random ``size``×``size`` image, ``box_score_thresh=0`` and the best
``--boxes`` detections. One CPU thread, CPU time (``time.process_time``), medians after a warm-up, the
contenders interleaved: camframe with ``group=False`` (one backward per box) and grouped (the default,
RoIAlign footprints); for scale, the model's forward with its detections, without gradients.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch
import torchvision

import camframe


def cpu(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--boxes", type=int, default=30)
    parser.add_argument("--size", type=int, default=640)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    image = np.random.default_rng(0).integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
    model = torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None,
                                         min_size=args.size, max_size=args.size, box_score_thresh=0.0,
                                         box_detections_per_img=args.boxes)
    explainers = {"one backward per box (group=False)": camframe.Explainer(model, group=False).__enter__(),
                  "grouped (default)": camframe.Explainer(model).__enter__()}
    grouped = explainers["grouped (default)"]
    x, metas = grouped.preprocess([image])

    def forward() -> None:
        with torch.no_grad():
            grouped.adapter.detect(grouped.model(x), metas, grouped.model)

    runs = {"forward + detections, no gradients": forward,
            **{k: (lambda e=e: e([image])) for k, e in explainers.items()}}
    results = {k: e([image]) for k, e in explainers.items()}  # warm-up
    forward()
    times: dict[str, list[float]] = {k: [] for k in runs}
    counts = {}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            if k in explainers:
                explainers[k].groups.update({"targets": 0, "backward passes": 0})
            times[k].append(cpu(fn))
            if k in explainers:
                counts[k] = dict(explainers[k].groups)
    for k, t in times.items():
        print(f"{k}: {statistics.median(t):.3f} s" + (f", {counts[k]}" if k in counts else ""))
    a, b = results.values()
    diff = max(float(((a.layer_maps[n] - b.layer_maps[n]).abs().amax((1, 2))
                      / a.layer_maps[n].amax((1, 2)).clamp(min=1e-30)).max()) for n in a.layer_maps)
    print(f"largest difference of a layer map from its one-backward map: {diff:.1e} of its max")
    for e in explainers.values():
        e.__exit__(None, None, None)


if __name__ == "__main__":
    main()
