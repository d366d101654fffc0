"""``*.detections.jpg`` draws what Ultralytics' ``plot()`` draws: masks, keypoints with their skeleton (rotated
boxes: test_family.py; synthetic detections: tests/output/test_drawings.py)."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch
import ultralytics
from ultralytics import YOLO

import camframe
from camframe.core.boxes import pair_iou
from camframe.cli import main
from camframe.output.render import draw_boxes, draw_detections

BUS = os.path.join(os.path.dirname(ultralytics.__file__), "assets", "bus.jpg")


def _raster(polygons: list, shape: tuple[int, ...]) -> np.ndarray:
    inside = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(inside, [np.round(np.array(p)).astype(np.int32) for p in polygons], 1)
    return inside.astype(bool)


@pytest.fixture(scope="module")
def seg(coco_yolo11n) -> YOLO:
    yolo = YOLO(str(coco_yolo11n["yolo11n-seg"]))
    yolo.task = yolo.overrides["task"] = "segment"  # the rebuilt checkpoint does not record its task
    return yolo


def test_segment_masks_in_original_pixels_as_predicts(seg):
    """Each detection's ``mask`` outline, filled, covers the mask ``predict()`` gives at the original size."""
    rgb = cv2.imread(BUS)[:, :, ::-1].copy()
    dets = camframe.Explainer(seg.model, guided=False)([rgb], boxes="top:1").detections[0]
    ref = seg.predict(BUS, retina_masks=True, verbose=False)[0]
    assert len(dets) >= 4
    for d in dets:
        j = max(range(len(ref.boxes)), key=lambda j: pair_iou(d.box, ref.boxes.xyxy[j].tolist()))
        mine, theirs = _raster(d.extra["mask"], rgb.shape), ref.masks.data[j].numpy().astype(bool)
        assert (mine & theirs).sum() / (mine | theirs).sum() >= 0.8, d


def test_cli_draws_each_mask_translucent_in_its_box_colour(seg, coco_yolo11n, tmp_path):
    out = tmp_path / "out"
    assert main(["explain", BUS, "--model", str(coco_yolo11n["yolo11n-seg"]), "--boxes", "0", "--quiet",
                 "--out", str(out)]) == 0
    (entry,) = json.loads((out / "manifest.json").read_text())["images"]
    drawn = cv2.imread(str(out / entry["overview"]))[:, :, ::-1].astype(float)
    original = cv2.imread(BUS)[:, :, ::-1].astype(float)
    change = np.abs(drawn - original).sum(2)
    masks = [_raster(d["mask"], original.shape) for d in entry["detections"]]
    boxes = np.zeros(original.shape[:2], bool)
    for d in entry["detections"]:
        x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
        boxes[max(y1 - 40, 0):y2 + 8, max(x1 - 8, 0):x2 + 8] = True  # the box, its outline and its label
    kernel = np.ones((9, 9), np.uint8)
    for mask in masks:
        core = cv2.erode(mask.astype(np.uint8), kernel).astype(bool)
        assert core.sum() > 500 and np.median(change[core]) > 40  # the fill: half the way to the box colour
    assert np.percentile(change[~boxes], 99) < 25  # nothing drawn outside the boxes (JPEG noise only)


def test_pose_keypoints_and_skeleton_drawn():
    """Keypoints are dots, joined by Ultralytics' COCO skeleton (``Annotator.skeleton``, 1-based there)."""
    from ultralytics.utils.plotting import Annotator

    torch.manual_seed(0)
    ex = camframe.Explainer(YOLO("yolov8n-pose.yaml").model, options={"conf": 0.0, "max_det": 3, "imgsz": 256})
    rgb = cv2.imread(BUS)[:, :, ::-1].copy()
    dets = ex([rgb], boxes="top:1").detections[0]
    annotator = Annotator(rgb.copy())
    assert [tuple(p) for p in ex.adapter.skeleton] == [(a - 1, b - 1) for a, b in annotator.skeleton]
    plain, dots = draw_boxes(rgb, dets), draw_detections(rgb, dets)
    drawn = draw_detections(rgb, dets, skeleton=ex.adapter.skeleton)
    changed, limbs = np.abs(dots.astype(int) - plain).sum(2) > 0, np.abs(drawn.astype(int) - dots).sum(2) > 0
    checked = 0
    inner = lambda x, y: 5 < x < rgb.shape[1] - 5 and 5 < y < rgb.shape[0] - 5  # noqa: E731 (not clipped to an edge)
    for d in dets:
        points = d.extra["keypoints"]
        assert len(points) == 17 and all(len(p) == 3 for p in points)
        for x, y, visibility in points:
            if visibility >= 0.25 and inner(x, y):
                assert changed[int(round(y)), int(round(x))], (x, y)
                checked += 1
        for a, b in ex.adapter.skeleton:
            (xa, ya, va), (xb, yb, vb) = points[a], points[b]
            if va >= 0.25 and vb >= 0.25 and inner(xa, ya) and inner(xb, yb) and np.hypot(xa - xb, ya - yb) > 20:
                along = [(round(xa + f * (xb - xa)), round(ya + f * (yb - ya))) for f in np.linspace(0.2, 0.8, 13)]
                assert np.mean([limbs[y - 1:y + 2, x - 1:x + 2].any() for x, y in along]) > 0.5, (a, b)  # the limb
                checked += 1
    assert checked >= 5
