"""camframe's detections are Ultralytics' own predict()'s, on photos of any shape, alone and in one batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import ultralytics
from ultralytics import YOLO

import camframe
from camframe.engine.smooth import TTA_SCALES, _zoom

ASSETS = os.path.join(os.path.dirname(ultralytics.__file__), "assets")


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """bus.jpg (810 x 1080), zidane.jpg (1280 x 720) and a 3:1 strip cut from bus.jpg (810 x 270), BGR."""
    bus = cv2.imread(os.path.join(ASSETS, "bus.jpg"))
    return {"bus": bus, "zidane": cv2.imread(os.path.join(ASSETS, "zidane.jpg")), "strip": bus[400:670].copy()}


def _same(dets: list[camframe.Detection], ref: ultralytics.engine.results.Results, name: str) -> None:
    """Same count, classes and order; boxes within 1 px, scores within 0.005; masks' outlines as masks.xy."""
    assert len(dets) == len(ref.boxes) > 0, name
    assert [d.class_id for d in dets] == ref.boxes.cls.int().tolist(), name
    assert np.abs(np.array([d.box for d in dets]) - ref.boxes.xyxy.numpy()).max() <= 1.0, name
    assert np.abs(np.array([d.score for d in dets]) - ref.boxes.conf.numpy()).max() <= 0.005, name
    if ref.masks is not None:  # in original pixels, rounded to 0.01 px
        for d, xy in zip(dets, ref.masks.xy):
            (segment,) = d.extra["mask"]
            segment = np.array(segment)
            assert segment.shape == xy.shape and np.abs(segment - xy).max() <= 0.01
    else:
        assert all("mask" not in d.extra for d in dets)


@pytest.mark.parametrize("name", ["yolo11n", "yolo11n-seg"])
def test_detections_equal_predict_alone_and_in_one_batch(coco_yolo11n, photos, name):
    path = str(coco_yolo11n[name])
    yolo = YOLO(path)
    refs = {k: yolo.predict(bgr, verbose=False)[0] for k, bgr in photos.items()}
    rgbs = [bgr[:, :, ::-1].copy() for bgr in photos.values()]
    with camframe.Explainer(camframe.load_model(path), guided=False) as ex:
        assert "predict(imgsz=640, conf=0.25, iou=0.7, max_det=300)" in ex.adapter.fidelity
        batch = ex(rgbs)
        for (k, ref), rgb, dets in zip(refs.items(), rgbs, batch.detections):
            _same(ex([rgb]).detections[0], ref, k)
            _same(dets, ref, f"{k} in the batch")
    # predict()'s inputs: 640 x 480, 384 x 640, 224 x 640, not one 640 square
    assert batch.sizes == [(640, 480), (384, 640), (224, 640)] and batch.maps.shape[-2:] == (640, 640)
    assert [t.image for t in batch.targets] == sorted(t.image for t in batch.targets)
    for t, heat in zip(batch.targets, batch.original()):
        assert heat.shape == rgbs[t.image].shape[:2]
        y, x = divmod(int(heat.argmax()), heat.shape[1])  # each map's peak lies at its own box
        x1, y1, x2, y2 = t.detection.box
        assert x1 - 16 <= x <= x2 + 16 and y1 - 16 <= y <= y2 + 16, (t.image, t.class_name, t.detection.box, (x, y))


def test_a_mixed_batch_explains_each_image_as_alone(coco_yolo11n, photos):
    """Images of different letterbox sizes in one batch: the same targets, scores and maps as one at a time
    (also the padding: zero outside each image's own input)."""
    rgbs = [bgr[:, :, ::-1].copy() for bgr in photos.values()]
    with camframe.Explainer(camframe.load_model(str(coco_yolo11n["yolo11n"])), guided=True) as ex:
        batch = ex(rgbs, boxes="top:2")
        alone = [ex([rgb], boxes="top:2") for rgb in rgbs]
    rows = [(t.image, t.box, t.class_id) for t in batch.targets]
    assert rows == [(b, t.box, t.class_id) for b, r in enumerate(alone) for t in r.targets]
    u = 0
    for b, r in enumerate(alone):
        h, w = r.maps.shape[-2:]
        for k in range(len(r.targets)):
            assert abs(batch.targets[u].score - r.targets[k].score) <= 1e-4
            assert torch.allclose(batch.maps[u, :h, :w], r.maps[k], atol=1e-4)
            assert float(batch.maps[u, h:].abs().sum() + batch.maps[u, :, w:].abs().sum()) == 0
            assert torch.allclose(batch.guided[u, :, :h, :w], r.guided[k], atol=1e-4)
            assert torch.allclose(batch.original()[u], r.original()[k], atol=1e-4)
            for layer, maps in r.layer_maps.items():
                lh, lw = maps.shape[-2:]
                assert torch.allclose(batch.layer_maps[layer][u, :lh, :lw], maps[k], atol=1e-4)
            u += 1
        assert torch.equal(batch.inputs[b, :, :h, :w], r.inputs[0])


def test_cli_lists_predicts_detections_in_one_batch(coco_yolo11n, photos, tmp_path):
    """One batch of the three, preprocessed in a worker process (per-image tensors of three sizes)."""
    for k, bgr in photos.items():
        cv2.imwrite(str(tmp_path / f"{k}.png"), bgr)
    path = str(coco_yolo11n["yolo11n"])
    files = [str(tmp_path / f"{k}.png") for k in photos]
    run = subprocess.run([sys.executable, "-m", "camframe", "explain", *files, "--model", path, "--batch-size", "3",
                          "--workers", "1", "--boxes", "top:1", "--quiet", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["fidelity"].startswith("as Ultralytics predict(imgsz=640, conf=0.25, iou=0.7, max_det=300)")
    images = manifest["images"]
    yolo = YOLO(path)
    for entry, (k, bgr) in zip(images, photos.items()):
        ref = yolo.predict(bgr, verbose=False)[0].boxes
        dets = entry["detections"]
        assert [d["class_id"] for d in dets] == ref.cls.int().tolist(), k
        assert np.abs(np.array([d["box"] for d in dets]) - ref.xyxy.numpy()).max() <= 1.0, k
        assert np.abs(np.array([d["detection_score"] for d in dets]) - ref.conf.numpy()).max() <= 0.005, k


def test_square_letterbox_on_request_is_predicts_rect_false(coco_yolo11n, photos):
    path = str(coco_yolo11n["yolo11n"])
    ex = camframe.Explainer(camframe.load_model(path), options={"rect": False}, guided=False)
    assert "rect=False" in ex.adapter.fidelity
    result = ex([photos["strip"][:, :, ::-1].copy()])
    assert result.sizes is None and result.inputs.shape[-2:] == (640, 640)
    _same(result.detections[0], YOLO(path).predict(photos["strip"], rect=False, verbose=False)[0], "strip")


def test_rebuilt_checkpoints_run_in_ultralytics_predict(coco_yolo11n, photos):
    """scripts/yolo11n_coco.py records each checkpoint's task: YOLO(path).predict() runs it (seg: with masks)."""
    for name, task in (("yolo11n", "detect"), ("yolo11n-seg", "segment")):
        yolo = YOLO(str(coco_yolo11n[name]))
        assert yolo.task == task
        result = yolo.predict(photos["bus"], verbose=False)[0]
        assert len(result.boxes) >= 5 and (result.masks is not None) == (task == "segment")


def test_mask_target_of_a_detection_from_elsewhere(coco_yolo11n, photos):
    """A mask target scored on outputs its detection did not come from (no box kept by ``detect``): the box its
    anchor predicts is the kept one, so the score is the same."""
    ex = camframe.Explainer(camframe.load_model(str(coco_yolo11n["yolo11n-seg"])), guided=False)
    rgb = photos["strip"][:, :, ::-1].copy()
    result = ex([rgb], target=["mask"])
    with ex, torch.no_grad():
        x, _ = ex.preprocess([rgb])
        outputs = ex.model(x)
        assert "camframe_input_boxes" not in outputs[1]
        again = ex.adapter.score(outputs, result.targets)
    assert len(result.targets) >= 3
    assert torch.allclose(again, torch.tensor([t.score for t in result.targets]), atol=1e-4)


def test_tta_smoothing_of_a_mixed_batch_equals_one_image_at_a_time(photos):
    """Two photos sharing a letterbox size (one batch), one of another size, smoothed by tta (whose zoomed views
    may differ in size): each map as when the photo is explained alone."""
    torch.manual_seed(0)
    model = camframe.load_model("yolov8n.yaml")
    bus = photos["bus"][:, :, ::-1]
    rgbs = [bus.copy(), bus[:1070, 100:640].copy(), photos["strip"][:, :, ::-1].copy()]
    with camframe.Explainer(model, options={"conf": 0.0, "max_det": 2, "imgsz": 128}, smooth="tta",
                            guided=False) as ex:
        x, _ = ex.preprocess(rgbs)
        assert [tuple(t.shape[-2:]) for t in x] == [(128, 96), (128, 96), (64, 128)]
        zoomed, _ = ex.preprocess([_zoom(rgb, 0.83)[0] for rgb in rgbs[:2]])  # tta's zoomed-out views differ
        assert [tuple(t.shape[-2:]) for t in zoomed] == [(128, 96), (128, 64)] and 0.83 in TTA_SCALES
        batch = ex(rgbs)
        alone = [ex([rgb]) for rgb in rgbs]
    assert batch.views == [v for r in alone for v in r.views]
    for u, heat in enumerate(batch.original()):
        b = batch.targets[u].image
        k = [t for t in batch.targets[:u] if t.image == b].__len__()
        torch.testing.assert_close(heat, alone[b].original()[k], rtol=0, atol=1e-4)
