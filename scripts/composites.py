"""Two-object classifier composites: two real photos of different ImageNet classes in one image.

Each composite puts two package photos side by side (both resized to the same height) or stacked
(both resized to the same width). Its ground truth is each half's box, named by the ImageNet class
of that half's object, as MobileNetV2 names it
(``torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]``); a category's id is
its output index in the classifier. A class-activation map for class A should land on A's half.
The photos were chosen because the pretrained MobileNetV2 ranks their class first or second on
each half (torchvision's preprocessing: first for five of the seven photos; second for the
motorcycle, after ``moped``, and for Grace Hopper's uniform, after ``bow tie``).

    python scripts/composites.py OUT_DIR

writes ``OUT_DIR/pair_NN_<a>_<b>.png`` and ``OUT_DIR/composites_coco.json``. Offline (photos from
scikit-image, matplotlib, scikit-learn and Ultralytics in the venv) and deterministic; files
already holding the same bytes are left alone. Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from PIL import Image
from real_photos import DataError, installed, write_if_changed

# photo name: (path inside its installed package, ImageNet class index)
PHOTOS = {
    "chelsea": ("skimage/data/chelsea.png", 285),  # Egyptian cat
    "coffee": ("skimage/data/coffee.png", 967),  # espresso
    "camera": ("skimage/data/camera.png", 872),  # tripod
    "motorcycle": ("skimage/data/motorcycle_left.png", 670),  # motor scooter
    "hopper": ("matplotlib/mpl-data/sample_data/grace_hopper.jpg", 652),  # military uniform
    "bus": ("ultralytics/assets/bus.jpg", 654),  # minibus
    "china": ("sklearn/datasets/images/china.jpg", 698),  # palace
}
SIDE_BY_SIDE = [("chelsea", "coffee"), ("hopper", "bus"), ("camera", "china"), ("motorcycle", "hopper"),
                ("bus", "chelsea")]
STACKED = [("coffee", "camera"), ("china", "hopper"), ("chelsea", "motorcycle"), ("bus", "coffee"),
           ("motorcycle", "china")]
HEIGHT = 256  # side by side: both halves this high
WIDTH = 320  # stacked: both halves this wide


def photo(name: str) -> Image.Image:
    """The package photo ``name`` as RGB."""
    path = installed(PHOTOS[name][0])
    if not path.is_file():
        raise DataError(f"{path}: not found")
    return Image.open(path).convert("RGB")


def compose(a: Image.Image, b: Image.Image, stacked: bool) -> tuple[Image.Image, list[list[int]]]:
    """``a`` and ``b`` side by side (same height) or stacked (same width); the image and both halves' boxes."""
    if stacked:
        a, b = (im.resize((WIDTH, round(im.height * WIDTH / im.width)), Image.LANCZOS) for im in (a, b))
        boxes = [[0, 0, WIDTH, a.height], [0, a.height, WIDTH, b.height]]
        size = (WIDTH, a.height + b.height)
    else:
        a, b = (im.resize((round(im.width * HEIGHT / im.height), HEIGHT), Image.LANCZOS) for im in (a, b))
        boxes = [[0, 0, a.width, HEIGHT], [a.width, 0, b.width, HEIGHT]]
        size = (a.width + b.width, HEIGHT)
    out = Image.new("RGB", size)
    out.paste(a, tuple(boxes[0][:2]))
    out.paste(b, tuple(boxes[1][:2]))
    return out, boxes


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def class_names() -> list[str]:
    """MobileNetV2's ImageNet class names, by output index (from torchvision)."""
    from torchvision.models import MobileNet_V2_Weights

    return MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]


def build(out_dir: Path) -> dict:
    """Write every composite into ``out_dir``; return the COCO ground truth (also written there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = class_names()
    images, annotations = [], []
    pairs = [(p, False) for p in SIDE_BY_SIDE] + [(p, True) for p in STACKED]
    for number, ((a, b), stacked) in enumerate(pairs, 1):
        image, boxes = compose(photo(a), photo(b), stacked)
        file_name = f"pair_{number:02d}_{a}_{b}.png"
        write_if_changed(out_dir / file_name, png_bytes(image))
        images.append({"id": number, "file_name": file_name, "width": image.width, "height": image.height,
                       "layout": "stacked" if stacked else "side-by-side",
                       "source": [PHOTOS[a][0], PHOTOS[b][0]]})
        for half, box in zip((a, b), boxes):
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": PHOTOS[half][1],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    used = sorted({index for _, index in PHOTOS.values()})
    coco = {"info": {"description": "Two-object classifier composites built by scripts/composites.py"},
            "images": images, "categories": [{"id": i, "name": names[i]} for i in used],
            "annotations": annotations}
    write_if_changed(out_dir / "composites_coco.json", (json.dumps(coco, indent=1) + "\n").encode())
    return coco


def main(argv: list[str] | None = None) -> int:
    """Command line: build the composites into OUT_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        coco = build(args.out_dir)
    except (DataError, OSError) as err:
        print(f"composites.py: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(coco['images'])} composites in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
