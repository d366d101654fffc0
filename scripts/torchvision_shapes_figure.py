"""Draw docs/img/torchvision-shapes.jpg: the shapes Faster R-CNN's boxes on two held-out images, then
each box's camframe map (default layers and method) with that box drawn on it.

    .venv/bin/python scripts/torchvision_shapes_figure.py [--out docs/img/torchvision-shapes.jpg]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

import camframe
from camframe.output.render import draw_boxes, overlay

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

SEEDS = (shapes.HELDOUT_SEEDS[0], shapes.HELDOUT_SEEDS[2])
TILE = 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "torchvision-shapes.jpg")
    args = ap.parse_args()
    model = camframe.load_model("camframe_torchvision.mobilenet_fpn:shapes_frcnn",
                                str(REPO / "tests" / "assets" / "shapes_frcnn.pt"))
    images = [np.ascontiguousarray(shapes.make_image(s)[0][:, :, ::-1]) for s in SEEDS]
    result = camframe.Explainer(model, guided=False, options={"conf": 0.5})(images)
    maps = result.original()
    rows = []
    for b, (image, dets) in enumerate(zip(images, result.detections)):
        tiles = [draw_boxes(image, dets)]
        for u, t in enumerate(result.targets):
            if t.image == b:
                tiles.append(draw_boxes(overlay(image, maps[u].numpy()), [t.detection], [t.class_name]))
        rows.append(np.hstack([cv2.resize(t, (TILE, TILE), interpolation=cv2.INTER_AREA) for t in tiles]))
    width = max(r.shape[1] for r in rows)
    sheet = np.vstack([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(f"{args.out}: {sheet.shape[1]}x{sheet.shape[0]}, {args.out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
