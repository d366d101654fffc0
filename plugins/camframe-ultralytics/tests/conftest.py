"""Fixtures: the synthetic shapes detector (tests/assets/shapes_yolo.pt) and held-out images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import camframe
from camframe.core.truth import Truth

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
import shapes  # noqa: E402


@pytest.fixture(scope="session")
def shapes_weights() -> Path:
    path = ROOT / "tests" / "assets" / "shapes_yolo.pt"
    assert path.is_file(), f"{path} missing: run scripts/train_shapes.py"
    return path


@pytest.fixture(scope="session")
def heldout() -> list[tuple]:
    """Held-out images (RGB) with ≥ 2 objects, and their ground truth."""
    out = []
    seed = shapes.HELDOUT_SEED_BASE
    while len(out) < 24:
        bgr, boxes = shapes.make_image(seed)
        seed += 1
        if len(boxes) >= 2:
            truth = Truth(torch.tensor([b for _, b in boxes], dtype=torch.float32), [c for c, _ in boxes],
                          [shapes.CLASSES[c] for c, _ in boxes])
            out.append((bgr[:, :, ::-1].copy(), bgr, truth))
    return out


@pytest.fixture(scope="session")
def coco_yolo11n() -> dict[str, Path]:
    """The official COCO YOLO11n and YOLO11n-seg, rebuilt from their ONNX exports (set-up step; cached)."""
    import yolo11n_coco

    cache = Path(os.environ.get("CAMFRAME_CACHE") or ROOT / ".cache")
    return yolo11n_coco.build(cache)


@pytest.fixture(scope="session")
def shapes_model(shapes_weights):
    return camframe.load_model(str(shapes_weights))
