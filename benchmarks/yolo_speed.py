"""Time to explain every box of one image, against baselines measured in the same run.

    python benchmarks/yolo_speed.py [--model yolov8n.yaml] [--imgsz 640] [--repeats 5] [--out docs/benchmarks.md]

(a) one plain forward+backward of the model to its input; (b) pytorch-grad-cam's HiResCAM with one
forward+backward per box (the usual per-box recipe); (c) Ultralytics' own ``predict(visualize=True)``
LayerCAM (top-16 predictions, one backward each); camframe with K = 1, 5, 20 boxes. Medians of
``--repeats`` runs after a warm-up, on the CPU, one thread per core.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
from pathlib import Path

import torch
import ultralytics
from pytorch_grad_cam import HiResCAM
from ultralytics import YOLO

import camframe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baselines import Logits, median_time, write_section  # noqa: E402

BUS = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    yolo = YOLO(args.model, verbose=False)
    image = camframe.load_image(BUS)
    rows: list[tuple[str, int, float]] = []

    ex = camframe.Explainer(yolo, options={"conf": 0.0, "imgsz": args.imgsz})
    x, _ = ex.preprocess([image])
    model = ex.model.eval()  # camframe's private copy: the same weights for every contender
    for p in model.parameters():
        p.requires_grad_(False)

    def forward_backward() -> None:
        xi = x.clone().requires_grad_()
        y = model(xi)[0]
        torch.autograd.grad(y.sum(), xi)

    base = median_time(forward_backward, args.repeats)
    rows.append(("(a) one forward + backward", 1, base))

    for k in (1, 5, 20):
        for grad_batch in (1, 4):
            cx = camframe.Explainer(yolo, options={"conf": 0.0, "max_det": k, "imgsz": args.imgsz},
                                    grad_batch=grad_batch)
            with cx:
                t = median_time(lambda: cx([image]), args.repeats)
            rows.append((f"camframe, grad_batch={grad_batch}", k, t))

    trainable = copy.deepcopy(model).requires_grad_(True)  # pytorch-grad-cam needs weights that require grad
    layers = [trainable.model[i] for i in trainable.model[-1].f]
    with camframe.Explainer(yolo, options={"conf": 0.0, "max_det": 20, "imgsz": args.imgsz}) as cx:
        anchors = [t.detection.index for t in cx([image]).targets]
        classes = [t.class_id for t in cx([image]).targets]
    wrapper = Logits(trainable)
    for k in (1, 5, 20):
        def loop() -> None:
            for a, c in zip(anchors[:k], classes[:k]):
                with HiResCAM(model=wrapper, target_layers=layers) as cam:
                    cam(input_tensor=x, targets=[lambda out, a=a, c=c: out[c, a]])
        loop_time = median_time(loop, max(1, args.repeats // 2))
        rows.append(("(b) pytorch-grad-cam HiResCAM, one pass per box", k, loop_time))

    with tempfile.TemporaryDirectory() as tmp:
        def visualize() -> None:
            yolo.predict(str(BUS), imgsz=args.imgsz, conf=0.0, visualize=True, verbose=False, project=tmp,
                         name="vis", exist_ok=True)
        t = median_time(visualize, max(1, args.repeats // 2))
        rows.append(("(c) Ultralytics predict(visualize=True), top-16 predictions", 16, t))
        plain = median_time(lambda: yolo.predict(str(BUS), imgsz=args.imgsz, conf=0.0, verbose=False),
                            args.repeats)
        rows.append(("    Ultralytics predict() without visualize", 0, plain))

    lines = [f"Model `{args.model}` (random weights from the yaml), `bus.jpg` letterboxed to "
             f"{args.imgsz}×{args.imgsz}, CPU: {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, ultralytics {ultralytics.__version__}. "
             f"Medians of {args.repeats} runs after a warm-up.", "",
             "| contender | boxes K | seconds | × (a) | seconds per box |", "|---|---|---|---|---|"]
    for name, k, t in rows:
        per_box = f"{t / k:.3f}" if k else "–"
        lines.append(f"| {name} | {k or '–'} | {t:.3f} | {t / base:.2f} | {per_box} |")
    cam = {(n, k): t for n, k, t in rows}
    best = {k: min(t for (n, kk), t in cam.items() if kk == k and n.startswith("camframe")) for k in (1, 5, 20)}
    loop20 = cam[("(b) pytorch-grad-cam HiResCAM, one pass per box", 20)]
    vis = cam[("(c) Ultralytics predict(visualize=True), top-16 predictions", 16)]
    lines += ["", f"- K = 1: camframe {best[1]:.3f} s = **{best[1] / base:.2f}×** one forward+backward "
              "(target ≤ 1.2×).",
              f"- K = 20: camframe {best[20]:.3f} s vs the per-box loop {loop20:.3f} s: "
              f"**{loop20 / best[20]:.1f}× faster** (target ≥ 5×).",
              f"- Per explained box at K = 20: camframe {best[20] / 20:.4f} s vs Ultralytics visualize "
              f"{vis / 16:.4f} s: **{vis / 16 / (best[20] / 20):.1f}× faster** (target > 1×)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_section(args.out, "yolo-speed", "### Explaining every box of an image\n\n" + text)


if __name__ == "__main__":
    main()
