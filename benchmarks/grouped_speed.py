"""Support-grouped gradients: every box's map from a few backward passes, against one backward per box.

    python benchmarks/grouped_speed.py [--repeats 5] [--out docs/benchmarks.md]

All in one run, on one CPU thread, timed by the process's CPU time (``time.process_time``): on a machine
shared with other jobs, that is what an idle machine's wall clock would show. Cases: (1) YOLOv8n (random
weights from the yaml) on ``bus.jpg`` at 640, the top K = 20 boxes at ``conf=0``, with pytorch-grad-cam's
HiResCAM per-box loop as the peer; (2) the COCO YOLO11n (``$CAMFRAME_CACHE/yolo11n.pt``) on a 2×2 mosaic
of ``bus.jpg`` and ``zidane.jpg`` at 640, every box at its default ``conf``; (3) the shapes YOLO
(``tests/assets/shapes_yolo.pt``) on a crowded image, a 5×5 mosaic of held-out shapes images at 1280, the
top 100 boxes; (4) torchvision's Faster R-CNN ResNet-50 FPN (random weights) on the mosaic at 640, its
30 best boxes at ``box_score_thresh=0`` (RoIAlign footprints). Each against one forward+backward of its own model and input (a), camframe with
``group=False`` (one backward per box) and with grouping (the default). Medians after a warm-up; the
contenders of a case run interleaved.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
import ultralytics
from ultralytics import YOLO

import camframe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "scripts"))
from _baselines import Logits, write_section  # noqa: E402
from yolo_speed import register_plugin  # noqa: E402

ASSETS = Path(ultralytics.__file__).parent / "assets"


def cpu(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(cpu(fn))
    return {k: statistics.median(t) for k, t in times.items()}


def mosaic() -> np.ndarray:
    bus, zidane = (cv2.resize(camframe.load_image(ASSETS / n), (640, 640)) for n in ("bus.jpg", "zidane.jpg"))
    return np.concatenate([np.concatenate([bus, zidane], 1), np.concatenate([zidane, bus], 1)], 0)


def crowded() -> np.ndarray:
    import shapes

    tiles = [shapes.make_image(shapes.HELDOUT_SEED_BASE + k, 256)[0][:, :, ::-1] for k in range(25)]
    return np.ascontiguousarray(np.concatenate([np.concatenate(tiles[r * 5:r * 5 + 5], 1) for r in range(5)], 0))


def case(name: str, detector: Any, image: np.ndarray, options: dict, repeats: int, peer: bool) -> dict[str, Any]:
    """Times of (a), camframe per box and grouped (and the pytorch-grad-cam loop), groups, largest difference."""
    per_box = camframe.Explainer(detector, options=options, group=False).__enter__()
    grouped = camframe.Explainer(detector, options=options).__enter__()
    try:
        x = per_box.preprocess([image])[0]
        model = per_box.model

        def forward_backward() -> None:
            xi = x.clone().requires_grad_()
            with torch.enable_grad():
                torch.autograd.grad(_total(model(xi)), xi)

        a, b = per_box([image]), grouped([image])
        peak = a.maps.amax((1, 2)).clamp(min=1e-30)
        diff = max(float(((a.layer_maps[n] - b.layer_maps[n]).abs().amax((1, 2)) /
                          a.layer_maps[n].amax((1, 2)).clamp(min=1e-30)).max()) for n in a.layer_maps)
        diff = max(diff, float(((a.maps - b.maps).abs().amax((1, 2)) / peak).max()))
        fns = {"(a) one forward + backward": forward_backward,
               "camframe, one backward per box (group=False)": lambda: per_box([image]),
               "camframe, grouped (default)": lambda: grouped([image])}
        if peer:
            fns["pytorch-grad-cam HiResCAM, one pass per box"] = _loop(model, x, a.targets)
        times = medians(fns, max(1, repeats // 2) if peer else repeats)
        return {"name": name, "boxes": len(a.targets), "groups": grouped.groups["backward passes"],
                "bound": grouped.groups["at least"], "times": times,
                "diff": diff, "size": tuple(x.shape[-2:])}
    finally:
        per_box.__exit__(None, None, None)
        grouped.__exit__(None, None, None)


def _total(outputs: Any) -> torch.Tensor:
    """The sum of every floating tensor in ``outputs`` (tuples, lists, dicts) that has autograd history."""
    if isinstance(outputs, torch.Tensor):
        return outputs.sum() if outputs.is_floating_point() and outputs.requires_grad else torch.zeros(())
    values = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, (list, tuple)) else []
    return sum((_total(v) for v in values), torch.zeros(()))


def _loop(model: torch.nn.Module, x: torch.Tensor, targets: list) -> Callable[[], None]:
    import copy

    from pytorch_grad_cam import HiResCAM

    trainable = copy.deepcopy(model).requires_grad_(True)
    layers = [trainable.model[i] for i in trainable.model[-1].f]
    wrapper = Logits(trainable)

    def run() -> None:
        for t in targets:
            with HiResCAM(model=wrapper, target_layers=layers) as cam:
                cam(input_tensor=x, targets=[lambda out, a=t.detection.index, c=t.class_id: out[c, a]])
    return run


def _faster_rcnn() -> torch.nn.Module:
    """torchvision's Faster R-CNN ResNet-50 FPN, random weights (seed 0), inputs at 640, its 30 best boxes."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None,
                                        min_size=640, max_size=640, box_score_thresh=0.0, box_detections_per_img=30)


def report(cases: list[dict[str, Any]], repeats: int) -> str:
    lines = [f"CPU: {platform.processor() or platform.machine()}, 1 thread, seconds of the process's CPU time "
             f"(the machine is shared: CPU time of one thread is the honest measure), torch {torch.__version__}, "
             f"ultralytics {ultralytics.__version__}. Medians of {repeats} runs after a warm-up (the per-box loop: "
             f"{max(1, repeats // 2)}), all in one run.", "",
             "| case | boxes | backward passes (at least) | contender | seconds | × (a) |", "|---|---|---|---|---|---|"]
    for c in cases:
        base = c["times"]["(a) one forward + backward"]
        for k, t in c["times"].items():
            passes = f"{c['groups']} ({c['bound']})" if "grouped" in k else "–"
            lines.append(f"| {c['name']} ({c['size'][1]}×{c['size'][0]}) | {c['boxes']} | {passes} | {k} | "
                         f"{t:.4f} | {t / base:.2f} |")
    lines.append("")
    for c in cases:
        t = c["times"]
        base, grouped = t["(a) one forward + backward"], t["camframe, grouped (default)"]
        line = (f"- {c['name']}: {c['boxes']} boxes in {c['groups']} backward passes (no exact grouping by "
                f"these windows needs fewer than {c['bound']}: that many boxes' windows all meet); grouped "
                f"**{grouped / base:.2f}×** one forward+backward (per box: "
                f"{t['camframe, one backward per box (group=False)'] / base:.2f}×)")
        if "pytorch-grad-cam HiResCAM, one pass per box" in t:
            line += f", **{t['pytorch-grad-cam HiResCAM, one pass per box'] / grouped:.1f}×** faster than the " \
                    "pytorch-grad-cam per-box loop"
        lines.append(line + f"; largest difference of a map from its one-backward map: {c['diff']:.1e} of its max.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    register_plugin()
    torch.manual_seed(0)
    cache = Path(os.environ.get("CAMFRAME_CACHE") or ROOT / ".cache")
    cases = [case("YOLOv8n (random), bus.jpg, K = 20", YOLO("yolov8n.yaml", verbose=False),
                  camframe.load_image(ASSETS / "bus.jpg"), {"conf": 0.0, "max_det": 20, "imgsz": 640},
                  args.repeats, peer=True),
             case("COCO YOLO11n, 2×2 mosaic of bus.jpg and zidane.jpg", YOLO(str(cache / "yolo11n.pt"),
                                                                             verbose=False),
                  mosaic(), {"imgsz": 640}, args.repeats, peer=False),
             case("shapes YOLO, crowded 5×5 shapes mosaic, top 100", YOLO(str(ROOT / "tests/assets/shapes_yolo.pt"),
                                                                         verbose=False),
                  crowded(), {"imgsz": 1280, "conf": 0.0, "max_det": 100}, args.repeats, peer=False),
             case("torchvision Faster R-CNN R50-FPN (random), 2×2 mosaic, top 30", _faster_rcnn(), mosaic(), {},
                  args.repeats, peer=False)]
    text = report(cases, args.repeats)
    print(text)
    if args.out:
        write_section(args.out, "grouped-speed", "### Every box from a few backward passes (support grouping)\n\n"
                      + text)


if __name__ == "__main__":
    main()
