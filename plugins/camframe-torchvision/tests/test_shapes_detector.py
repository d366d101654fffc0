"""The Faster R-CNN (MobileNetV2 + FPN) trained on the synthetic shapes (tests/assets/shapes_frcnn.pt):
it finds the shapes, camframe reports its own eval output, and each box's map lies on that box."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import camframe
from camframe import metrics
from camframe import cli as _cli

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
import shapes  # noqa: E402

SPEC = "camframe_torchvision.mobilenet_fpn:shapes_frcnn"
WEIGHTS = ROOT / "tests" / "assets" / "shapes_frcnn.pt"
CONF = 0.5


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


@pytest.fixture(scope="module")
def model():
    assert WEIGHTS.is_file(), f"{WEIGHTS} missing: run scripts/train_shapes_torchvision.py"
    return camframe.load_model(SPEC, str(WEIGHTS))


@pytest.fixture(scope="module")
def images():
    """Four held-out images (RGB) and their ground truth [(class name, box)]."""
    out = []
    for seed in shapes.HELDOUT_SEEDS[:4]:
        bgr, boxes = shapes.make_image(seed)
        out.append((np.ascontiguousarray(bgr[:, :, ::-1]), [(shapes.CLASSES[c], b) for c, b in boxes]))
    return out


@pytest.fixture(scope="module")
def result(model, images):
    return camframe.Explainer(model, guided=False, options={"conf": CONF})([im for im, _ in images])


def test_finds_every_shape(result, images):
    """Every ground-truth shape has a detection of its class with IoU > 0.5, and nothing else is detected."""
    for dets, (_, truth) in zip(result.detections, images):
        assert len(dets) == len(truth)
        for name, box in truth:
            assert max(_iou(d.box, box) for d in dets if d.class_name == name) > 0.5, (name, box, dets)


def test_detections_are_the_models_own(model, result, images):
    model.eval()
    with torch.no_grad():
        own = model([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im, _ in images])
    for dets, out in zip(result.detections, own):
        keep = out["scores"] > CONF
        assert [d.class_id for d in dets] == out["labels"][keep].tolist()
        torch.testing.assert_close(torch.tensor([d.box for d in dets]), out["boxes"][keep], atol=1e-3, rtol=0)
        torch.testing.assert_close(torch.tensor([d.score for d in dets]), out["scores"][keep], atol=1e-5, rtol=0)


def test_each_map_peaks_in_its_own_box(result, images):
    maps = result.original()
    boxes = torch.tensor([t.detection.box for t in result.targets])
    hits = torch.cat([metrics.pointing_game(m[None], boxes[i:i + 1]) for i, m in enumerate(maps)])
    energy = torch.cat([metrics.energy_pointing_game(m[None], boxes[i:i + 1]) for i, m in enumerate(maps)])
    assert len(hits) == sum(len(t) for _, t in images)
    assert hits.float().mean() >= 0.9 and energy.mean() > 0.6, (hits, energy)


def test_cli_loads_the_factory_and_weights(tmp_path):
    image = ROOT / "tests" / "assets" / "shapes" / "shapes_000.jpg"
    out = tmp_path / "out"
    assert _cli.main(["explain", str(image), "--model", SPEC, "--weights", str(WEIGHTS), "--conf", str(CONF),
                      "--device", "cpu", "--no-guided", "--quiet", "--out", str(out)]) == 0
    (entry,) = json.loads((out / "manifest.json").read_text())["images"]
    truth = [shapes.CLASSES[int(line.split()[0])] for line in image.with_suffix(".txt").read_text().splitlines()]
    assert sorted(e["class_name"] for e in entry["explanations"]) == sorted(truth)
    assert all((out / e["files"]["cam"]).is_file() for e in entry["explanations"])


def test_detections_are_the_models_own_on_non_square_images_in_one_batch(model, images):
    """A 2:1 pair, a 3:1 strip and a portrait crop, explained in one batch: camframe's detections are
    ``model.eval()(images)``'s (boxes within 1 px, scores within 0.005), and each is explained."""
    a, b = images[0][0], images[1][0]
    batch = [np.ascontiguousarray(np.concatenate([a, b], axis=1)), np.ascontiguousarray(a[100:207]),
             np.ascontiguousarray(b[:, 60:260])]
    assert [im.shape[:2] for im in batch] == [(320, 640), (107, 320), (320, 200)]
    result = camframe.Explainer(model, guided=False, options={"conf": CONF})(batch)
    model.eval()
    with torch.no_grad():
        own = model([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in batch])
    for dets, out in zip(result.detections, own):
        keep = out["scores"] > CONF
        assert keep.sum() > 0 and [d.class_id for d in dets] == out["labels"][keep].tolist()
        torch.testing.assert_close(torch.tensor([d.box for d in dets]), out["boxes"][keep], atol=1, rtol=0)
        torch.testing.assert_close(torch.tensor([d.score for d in dets]), out["scores"][keep], atol=0.005, rtol=0)
    assert [(t.image, t.box) for t in result.targets] == [(i, k) for i, d in enumerate(result.detections)
                                                          for k in range(len(d))]
