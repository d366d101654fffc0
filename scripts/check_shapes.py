"""Check the quality of the shapes detector (tests/assets/shapes_yolo.pt).

    YOLO_OFFLINE=1 .venv/bin/python scripts/check_shapes.py [--weights PATH] [--n 50]

Prints
  * val mAP50 / mAP50-95 on a freshly generated val split (same seeds as training's val),
  * the held-out match rate: on N images from shapes.HELDOUT_SEEDS, the fraction of
    ground-truth boxes matched by a prediction of the same class with IoU > 0.5
    (greedy one-to-one matching), using YOLO(path).predict(img, conf=0.25, imgsz=<train imgsz>),
    plus the number of unmatched (false-positive) predictions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import shapes  # noqa: E402


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def heldout_match(model, n: int, imgsz: int, conf: float = 0.25, iou_thr: float = 0.5):
    n_gt = n_hit = n_pred = 0
    per_img_ok = 0
    for seed in list(shapes.HELDOUT_SEEDS)[:n]:
        img, gts = shapes.make_image(seed)
        r = model.predict(img, conf=conf, imgsz=imgsz, device="cpu", verbose=False)[0]
        boxes = r.boxes.xyxy.cpu().numpy()
        clss = r.boxes.cls.cpu().numpy().astype(int)
        used = np.zeros(len(boxes), bool)
        hits = 0
        for c, g in gts:
            best, bj = iou_thr, -1
            for j, (b, pc) in enumerate(zip(boxes, clss)):
                if used[j] or pc != c:
                    continue
                v = iou(g, b)
                if v > best:
                    best, bj = v, j
            if bj >= 0:
                used[bj] = True
                hits += 1
        n_gt += len(gts)
        n_hit += hits
        n_pred += len(boxes)
        per_img_ok += hits == len(gts)
    return n_hit, n_gt, n_pred - n_hit, per_img_ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=str(REPO / "tests" / "assets" / "shapes_yolo.pt"))
    ap.add_argument("--n", type=int, default=50, help="number of held-out images")
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--imgsz", type=int, default=None, help="default: the imgsz the weights were trained at")
    ap.add_argument("--no-val", action="store_true")
    args = ap.parse_args()

    from ultralytics import YOLO

    model = YOLO(args.weights)
    imgsz = args.imgsz or int((getattr(model, "ckpt", None) or {}).get("train_args", {}).get("imgsz", 256))
    print(f"weights {args.weights} ({Path(args.weights).stat().st_size / 1e6:.2f} MB), imgsz {imgsz}")

    if not args.no_val:
        with tempfile.TemporaryDirectory(prefix="shapes_val_") as d:
            yaml = shapes.write_dataset(Path(d), 0, args.n_val)
            m = model.val(data=str(yaml), imgsz=imgsz, batch=16, device="cpu", plots=False, workers=0,
                          project=str(Path(d) / "runs"), name="val", verbose=False)
            print(f"val ({args.n_val} imgs): mAP50={m.box.map50:.4f} mAP50-95={m.box.map:.4f}")

    hit, n_gt, fp, ok = heldout_match(model, args.n, imgsz)
    print(f"held-out ({args.n} imgs, conf=0.25, IoU>0.5, same class): matched {hit}/{n_gt} = "
          f"{hit / max(n_gt, 1):.1%} of GT boxes; {fp} unmatched predictions; "
          f"{ok}/{args.n} images fully matched")


if __name__ == "__main__":
    main()
