"""Train a small YOLO on the synthetic shapes data set (CPU only, offline).

Exact command used to produce tests/assets/shapes_yolo.pt (run from the repo root):

    YOLO_OFFLINE=1 .venv/bin/python scripts/train_shapes.py

Defaults: 1000 train / 100 val images (320x320), YOLOv8n from yaml (random init),
imgsz=256, 25 epochs, batch 16, device=cpu, seed 0, deterministic. About 30 min
on 2 idle CPU cores (the committed weights took 42.7 min while other jobs shared
the cores); val mAP50 0.977, mAP50-95 0.854. Everything (data set, runs/) lives in a temp dir outside the
repo; only the final stripped best weights are copied to --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # no connectivity checks / downloads
os.environ.setdefault("YOLO_VERBOSE", "True")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shapes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="yolov8n.yaml")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", type=float, default=None, help="hard training time cap in hours (ultralytics `time`)")
    ap.add_argument("--workdir", default=None, help="keep data set + runs here instead of a fresh temp dir")
    ap.add_argument("--out", default=str(REPO / "tests" / "assets" / "shapes_yolo.pt"))
    args = ap.parse_args()

    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS

    # No telemetry / third-party loggers. dict.update bypasses SettingsManager.update, which
    # would persist the change to the user's ~/.config/Ultralytics/settings.json.
    dict.update(SETTINGS, {k: False for k in ("sync", "clearml", "comet", "dvc", "mlflow", "raytune",
                                               "tensorboard", "wandb")})

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="shapes_train_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data_yaml = shapes.write_dataset(work / "data", args.n_train, args.n_val, seed=0, size=320)
    print(f"data set written to {data_yaml.parent} in {time.time() - t0:.1f}s", flush=True)

    model = YOLO(args.model)
    t1 = time.time()
    train_kw = dict(
        data=str(data_yaml),
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device="cpu",
        workers=args.workers,
        amp=False,
        plots=False,
        seed=args.seed,
        deterministic=True,
        project=str(work / "runs"),
        name="shapes",
        exist_ok=True,
        pretrained=False,
        cache="ram",
        patience=100,
        close_mosaic=max(1, args.epochs // 5),
        warmup_epochs=1,
        fliplr=0.5,
        flipud=0.5,
        degrees=0.0,
        verbose=True,
    )
    if args.time:
        train_kw["time"] = args.time
    model.train(**train_kw)
    train_s = time.time() - t1

    best = work / "runs" / "shapes" / "weights" / "best.pt"
    if not best.exists():
        best = work / "runs" / "shapes" / "weights" / "last.pt"
    # best.pt is already stripped by the trainer's final_eval (strip_optimizer); do it again to be sure.
    from ultralytics.utils.torch_utils import strip_optimizer

    strip_optimizer(best)

    # Final validation of the saved weights.
    m = YOLO(str(best))
    metrics = m.val(data=str(data_yaml), imgsz=args.imgsz, batch=args.batch, device="cpu", plots=False,
                    project=str(work / "runs"), name="val", exist_ok=True, workers=0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, out)
    print(f"\nfinal val mAP50={metrics.box.map50:.4f} mAP50-95={metrics.box.map:.4f}")
    print(f"training wall time {train_s / 60:.1f} min; total {(time.time() - t0) / 60:.1f} min")
    print(f"weights -> {out} ({out.stat().st_size / 1e6:.2f} MB); work dir {work}")


if __name__ == "__main__":
    main()
