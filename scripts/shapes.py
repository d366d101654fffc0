"""Synthetic "shapes" detection data set: a detector whose right answers are known.

Every image is a cluttered background (gradient, noise, random lines and soft
blotches) with 2-5 filled shapes drawn on it in random colours. The shapes never
overlap (their boxes are kept apart by a small gap, so pairwise IoU is 0), and
each ground-truth box is the tight bounding box of the pixels of its shape.

Everything is a pure function of an integer seed (numpy + cv2 only), so a test
can regenerate any image and its boxes exactly.

Seed ranges (disjoint):
    TRAIN_SEEDS    = 0 ..              used by write_dataset(seed=s) for train
    VAL_SEEDS      = 500_000 ..        used by write_dataset for val
    HELDOUT_SEEDS  = 1_000_000 ..      never used for training or validation;
                                       use these in tests / demos.

Command line: ``python scripts/shapes.py OUT_DIR [N]`` writes N (default 4)
held-out images ``shapes_000.jpg`` + YOLO label files ``shapes_000.txt`` there.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import cv2
import numpy as np

CLASSES: list[str] = ["circle", "square", "triangle", "cross"]

TRAIN_SEED_BASE = 0
VAL_SEED_BASE = 500_000
HELDOUT_SEED_BASE = 1_000_000
HELDOUT_SEEDS = range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + 100_000)

MIN_OBJ = 24  # object size range in pixels (at size=320; scaled with size)
MAX_OBJ = 120
GAP = 6  # minimum gap in pixels between any two object boxes

Box = tuple[float, float, float, float]


def _rand_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Clutter that is NOT any of the shapes: gradient + blotches + lines + noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(ang) + yy * math.sin(ang))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]

    # soft, heavily blurred blotches (irregular, no hard edges)
    blot = np.zeros((size, size, 3), np.float32)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, size, 2)
        ax, ay = rng.uniform(0.05, 0.3, 2) * size
        cv2.ellipse(blot, (int(cx), int(cy)), (int(ax), int(ay)), float(rng.uniform(0, 180)),
                    0, 360, [float(v) for v in rng.uniform(-90, 90, 3)], -1)
    k = int(size * 0.15) | 1
    blot = cv2.GaussianBlur(blot, (k, k), 0)
    img = img + blot

    # thin random lines and polylines (clutter with real edges)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 10))):
        p1 = tuple(int(v) for v in rng.integers(-size // 4, size + size // 4, 2))
        p2 = tuple(int(v) for v in rng.integers(-size // 4, size + size // 4, 2))
        cv2.line(img, p1, p2, _rand_color(rng), int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 3))):
        pts = rng.integers(0, size, (int(rng.integers(3, 6)), 2)).astype(np.int32)
        cv2.polylines(img, [pts], False, _rand_color(rng), 1, cv2.LINE_AA)

    noise = rng.normal(0, rng.uniform(4, 14), img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _fit_poly(pts: np.ndarray, ang_deg: float, c: float, r: float) -> np.ndarray:
    """Rotate polygon `pts` (centred at 0) by ang_deg, scale so it spans [c-r, c+r]."""
    a = math.radians(ang_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    p = pts @ rot.T
    p = p - (p.max(0) + p.min(0)) / 2
    p = p * (r / np.abs(p).max())
    return np.round(p + c).astype(np.int32)


def _shape_mask(cls: int, s: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 mask (s x s) of shape `cls`, roughly filling the square."""
    m = np.zeros((s, s), np.uint8)
    c = (s - 1) / 2.0
    r = s / 2.0 - 1
    name = CLASSES[cls]
    if name == "circle":
        cv2.circle(m, (int(round(c)), int(round(c))), int(round(r)), 255, -1, cv2.LINE_AA)
        return m
    if name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
        ang = rng.uniform(-20, 20)
    elif name == "triangle":
        pts = np.array([[math.cos(k * 2 * math.pi / 3), math.sin(k * 2 * math.pi / 3)] for k in range(3)])
        ang = rng.uniform(0, 360)
    elif name == "cross":
        h = rng.uniform(0.28, 0.4)  # half arm width relative to arm half-length 1
        pts = np.array([[-h, -1], [h, -1], [h, -h], [1, -h], [1, h], [h, h],
                        [h, 1], [-h, 1], [-h, h], [-1, h], [-1, -h], [-h, -h]], np.float64)
        ang = rng.uniform(-30, 30)
    else:  # pragma: no cover
        raise ValueError(name)
    cv2.fillPoly(m, [_fit_poly(pts, ang, c, r)], 255, cv2.LINE_AA)
    return m


def _contrasting_color(rng: np.random.Generator, ref: np.ndarray) -> np.ndarray:
    """Random colour that differs clearly from the mean background colour `ref`."""
    for _ in range(50):
        col = rng.integers(0, 256, 3).astype(np.float32)
        if np.abs(col - ref).sum() > 150:
            return col
    return 255.0 - ref


def _boxes_clear(b: Box, boxes: list[Box], gap: float) -> bool:
    x1, y1, x2, y2 = b
    for (u1, v1, u2, v2) in boxes:
        if x1 < u2 + gap and u1 < x2 + gap and y1 < v2 + gap and v1 < y2 + gap:
            return False
    return True


def make_image(seed: int, size: int = 320) -> tuple[np.ndarray, list[tuple[int, Box]]]:
    """Return (BGR uint8 image [size, size, 3], [(class_id, (x1, y1, x2, y2)), ...]).

    Boxes are tight pixel boxes (x2/y2 exclusive, i.e. x2 - x1 is the width) of
    non-overlapping shapes; 2-5 objects per image, sizes ~24-120 px at size=320.
    """
    rng = np.random.default_rng(seed)
    img = _background(rng, size).astype(np.float32)
    scale = size / 320.0
    lo, hi = MIN_OBJ * scale, MAX_OBJ * scale
    n_obj = int(rng.integers(2, 6))

    placed: list[Box] = []
    out: list[tuple[int, Box]] = []
    attempts = 0
    while len(out) < n_obj and attempts < 400:
        attempts += 1
        # log-uniform size, shrinking if placement keeps failing
        shrink = 1.0 if attempts < 100 else 0.6
        s = int(round(math.exp(rng.uniform(math.log(lo), math.log(max(lo + 1, hi * shrink))))))
        cls = int(rng.integers(0, len(CLASSES)))
        x0 = int(rng.integers(2, size - s - 2))
        y0 = int(rng.integers(2, size - s - 2))
        mask = _shape_mask(cls, s, rng)
        ys, xs = np.nonzero(mask > 127)
        if len(xs) == 0:
            continue
        box = (float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1), float(y0 + ys.max() + 1))
        if not _boxes_clear(box, placed, GAP * scale):
            continue
        region = img[y0:y0 + s, x0:x0 + s]
        a = (mask.astype(np.float32) / 255.0)[..., None]
        ref = (region * a).sum((0, 1)) / max(float(a.sum()), 1.0)
        col = _contrasting_color(rng, ref)
        # slight shading across the shape so colour is not perfectly flat
        shade = 1.0 + rng.uniform(-0.15, 0.15) * (np.linspace(-1, 1, s, dtype=np.float32)[None, :, None])
        fill = np.clip(col[None, None, :] * shade, 0, 255)
        img[y0:y0 + s, x0:x0 + s] = region * (1 - a) + fill * a
        placed.append(box)
        out.append((cls, box))

    noise = rng.normal(0, 3, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return img, out


def yolo_label_lines(boxes: list[tuple[int, Box]], size: int) -> list[str]:
    """YOLO txt lines "cls cx cy w h" (normalised) for `boxes` in a size x size image."""
    lines = []
    for cls, (x1, y1, x2, y2) in boxes:
        lines.append(f"{cls} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} "
                     f"{(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}")
    return lines


def _write_split(img_dir: Path, lbl_dir: Path, seeds, size: int, ext: str = ".png") -> None:
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        img, boxes = make_image(s, size)
        name = f"{s:07d}"
        cv2.imwrite(str(img_dir / f"{name}{ext}"), img)
        (lbl_dir / f"{name}.txt").write_text("\n".join(yolo_label_lines(boxes, size)) + "\n")


def write_labelled(folder: Path, seeds, size: int = 320) -> Path:
    """``folder`` holding ``s0.png``, ``s1.png``... of ``seeds``, each with its YOLO label ``s<i>.txt`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        img, boxes = make_image(seed, size)
        cv2.imwrite(str(folder / f"s{i}.png"), img)
        (folder / f"s{i}.txt").write_text("\n".join(yolo_label_lines(boxes, size)) + "\n")
    return folder


def write_dataset(root: Path, n_train: int, n_val: int, seed: int = 0, size: int = 320) -> Path:
    """Write an Ultralytics data set under `root`; return the data.yaml path.

    Train images use seeds TRAIN_SEED_BASE + seed + [0, n_train), val images use
    VAL_SEED_BASE + seed + [0, n_val); keep seed + n < 500_000 so they stay disjoint
    from each other and from HELDOUT_SEEDS.
    """
    root = Path(root).resolve()
    assert seed + max(n_train, n_val) <= VAL_SEED_BASE, "seed ranges would overlap"
    _write_split(root / "images" / "train", root / "labels" / "train",
                 range(TRAIN_SEED_BASE + seed, TRAIN_SEED_BASE + seed + n_train), size)
    _write_split(root / "images" / "val", root / "labels" / "val",
                 range(VAL_SEED_BASE + seed, VAL_SEED_BASE + seed + n_val), size)
    yaml = root / "data.yaml"
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return yaml


def write_samples(out_dir: Path, n: int = 4, size: int = 320, first_seed: int = HELDOUT_SEED_BASE) -> None:
    """Write n held-out samples shapes_000.jpg + shapes_000.txt (YOLO labels) to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, boxes = make_image(first_seed + i, size)
        cv2.imwrite(str(out_dir / f"shapes_{i:03d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        (out_dir / f"shapes_{i:03d}.txt").write_text("\n".join(yolo_label_lines(boxes, size)) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: python {sys.argv[0]} OUT_DIR [N]")
    write_samples(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4)
