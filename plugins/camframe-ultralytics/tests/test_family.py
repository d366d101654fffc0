"""The rest of the Ultralytics family: segmentation (mask targets), pose (keypoint targets) and classify models."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import ultralytics
from ultralytics import RTDETR, YOLO

import camframe
from camframe.core.boxes import pair_iou
from camframe.output.render import draw_boxes
from camframe.testing import check_adapter

BUS = os.path.join(os.path.dirname(ultralytics.__file__), "assets", "bus.jpg")
IMGSZ = 256


@pytest.fixture(scope="module")
def bus() -> tuple[np.ndarray, np.ndarray]:
    """bus.jpg, RGB, and a crop of it, BGR, that is not square (500 x 700: predict()'s rectangular letterbox,
    160 x 224 at IMGSZ, differs from the square)."""
    bgr = cv2.imread(BUS)
    return bgr[:, :, ::-1].copy(), bgr[300:800, 50:750].copy()


def _yolo(yaml: str, task: str | None = None) -> YOLO:
    torch.manual_seed(0)
    return YOLO(yaml, task=task)


def _snapshot(model: torch.nn.Module) -> tuple:
    return ([(n, m.training, len(m._forward_hooks), len(m._backward_hooks)) for n, m in model.named_modules()],
            [(p.requires_grad, p.detach().clone()) for p in model.parameters()])


def _unchanged(before: tuple, model: torch.nn.Module) -> bool:
    modules, params = _snapshot(model)
    return modules == before[0] and all(g == g0 and torch.equal(p, p0)
                                        for (g, p), (g0, p0) in zip(params, before[1]))


def _explain_family(model: torch.nn.Module, image: np.ndarray, target: list) -> camframe.Result:
    """Explain ``target`` for the top 4 boxes; check per-target original-size maps, gradients at every
    default layer, and the model left as it was."""
    before = _snapshot(model)
    ex = camframe.Explainer(model, options={"conf": 0.0, "max_det": 4, "imgsz": IMGSZ})
    result = ex([image], target=target)
    assert _unchanged(before, model)
    assert len(result.targets) == 4 * len(target)
    assert [tuple(m.shape) for m in result.original()] == [image.shape[:2]] * len(result.targets)
    assert all(float(m.amax()) > 0 for m in result.maps)
    for layer in ex.layers:
        assert bool(result.reached[layer].any()), layer
    # each target's map is its own: a box's mask / keypoint map differs from its class map
    assert not torch.allclose(result.maps[0], result.maps[len(target) - 1])
    return result


def _compare_with_predict(result: camframe.Result, ref: ultralytics.engine.results.Results, top: int) -> None:
    """The top detections equal predict()'s, in order (box, score, class)."""
    dets = result.detections[0][:top]
    assert len(dets) == top and len(ref.boxes) >= top
    for d, box, conf, cls in zip(dets, ref.boxes.xyxy.numpy(), ref.boxes.conf.numpy(), ref.boxes.cls.numpy()):
        assert np.abs(np.array(d.box) - box).max() <= 1.0
        assert abs(d.score - float(conf)) <= 1e-4 and d.class_id == int(cls)


def test_segment_detections_and_mask_targets(bus):
    yolo = _yolo("yolov8n-seg.yaml")
    result = _explain_family(yolo.model, bus[1][:, :, ::-1].copy(), ["mask", 0])
    ref = copy.deepcopy(yolo).predict(bus[1], imgsz=IMGSZ, conf=0.0, max_det=50, verbose=False)[0]
    _compare_with_predict(result, ref, 4)
    assert result.targets[0].class_name == "mask" and result.targets[1].class_name == "0"


def test_segment_real_weights_person_mask_maps_peak_inside_their_masks(coco_yolo11n, bus):
    rgb, _ = bus
    yolo = YOLO(str(coco_yolo11n["yolo11n-seg"]))
    result = camframe.Explainer(yolo.model)([rgb], target=["mask"])
    ref = yolo.predict(BUS, retina_masks=True, verbose=False)[0]  # masks at the original image's size
    assert [d.class_name for d in result.detections[0]] == [ref.names[int(c)] for c in ref.boxes.cls]
    assert {"bus", "person"} <= {d.class_name for d in result.detections[0]}
    for t, heat in zip(result.targets, result.original()):
        assert t.class_name == "mask" and heat.shape == rgb.shape[:2]
        y, x = divmod(int(heat.argmax()), heat.shape[1])
        x1, y1, x2, y2 = t.detection.box
        # pixel x covers [x, x + 1)
        assert x1 - 1 < x <= x2 and y1 - 1 < y <= y2, (t.detection.class_name, t.detection.box, (x, y))
        j = max(range(len(ref.boxes)), key=lambda j: pair_iou(t.detection.box, ref.boxes.xyxy[j].tolist()))
        if t.detection.class_name == "person":
            assert bool(ref.masks.data[j, y, x]), (t.detection.box, (x, y))


def test_pose_detections_keypoints_and_keypoint_targets(bus):
    yolo = _yolo("yolov8n-pose.yaml")
    rgb = bus[1][:, :, ::-1].copy()
    result = _explain_family(yolo.model, rgb, ["kpt:nose", "kpt:16", 0])
    assert [t.class_name for t in result.targets[:3]] == ["kpt:nose", "kpt:right_ankle", "0"]
    ref = copy.deepcopy(yolo).predict(bus[1], imgsz=IMGSZ, conf=0.0, max_det=50, verbose=False)[0]
    _compare_with_predict(result, ref, 4)
    for d, points in zip(result.detections[0], ref.keypoints.data[:4].numpy()):
        assert np.abs(np.array(d.extra["keypoints"]) - points).max() <= 1.0
    # the keypoint target is the keypoint's visibility logit at the box's anchor
    vis = torch.tensor([d.extra["keypoints"][0][2] for d in result.detections[0][:4]])
    assert torch.allclose(torch.tensor([t.score for t in result.targets[0::3]]).sigmoid(), vis, atol=1e-4)


@pytest.mark.parametrize("yaml", ["yolov8n-pose.yaml", "yolov8n.yaml"])
def test_nms_on_the_best_anchors_first_keeps_equal_scores_in_order(yaml, bus, monkeypatch):
    """Random weights score many anchors exactly alike: NMS on the best anchors first still keeps the
    boxes one NMS over all anchors keeps, in the same order (its sort is stable, like ours)."""
    from camframe_ultralytics import _adapter

    ex = camframe.Explainer(_yolo(yaml).model, options={"conf": 0.0, "max_det": 20, "imgsz": 640}, guided=False)
    with ex:
        x, metas = ex.preprocess([bus[0]])
        with torch.no_grad():
            outputs = ex.model(x)
        scores = ex.adapter._branch(outputs)[0][0, 4:4 + len(ex.adapter.names)].amax(0).sort(descending=True).values
        assert (scores[1:80] == scores[:79]).any()  # equal scores among the best 4 x 20 anchors
        fast = ex.adapter.detect(outputs, metas, ex.model)[0]
        monkeypatch.setattr(_adapter, "PREFIX", 10**9)
        full = ex.adapter.detect(outputs, metas, ex.model)[0]
    assert len(fast) == 20
    assert [(d.index, d.class_id, d.box) for d in fast] == [(d.index, d.class_id, d.box) for d in full]


def test_obb_rotated_detections_drawn_rotated(bus):
    yolo = _yolo("yolov8n-obb.yaml")
    rgb = bus[1][:, :, ::-1].copy()
    result = _explain_family(yolo.model, rgb, [0, 1])
    ref = copy.deepcopy(yolo).predict(bus[1], imgsz=IMGSZ, conf=0.0, max_det=50, verbose=False)[0].obb
    for d, xywhr, corners, conf, cls in zip(result.detections[0], ref.xywhr, ref.xyxyxyxy, ref.conf, ref.cls):
        assert np.abs(np.array(d.extra["xywhr"]) - xywhr.numpy()).max() <= 0.5
        assert np.abs(np.array(d.extra["polygon"]) - corners.numpy()).max() <= 0.5
        assert abs(d.score - float(conf)) <= 1e-4 and d.class_id == int(cls)
    check_adapter(yolo.model, [rgb], options={"conf": 0.0, "max_det": 2, "imgsz": IMGSZ})
    # the overview draws the rotated box: its edge, not the enclosing rectangle's corner
    diamond = [[50, 10], [90, 50], [50, 90], [10, 50]]
    det = camframe.Detection((10.0, 10.0, 90.0, 90.0), 0, "x", 0.9, extra={"polygon": diamond})
    drawn = draw_boxes(np.zeros((100, 100, 3), np.uint8), [det], labels=[""])
    assert drawn[70, 70].any() and drawn[50, 90].any() and not drawn[88:, 88:].any()


def test_rtdetr_kept_queries_are_the_targets(bus):
    torch.manual_seed(0)
    rtdetr = RTDETR("rtdetr-l.yaml")
    rgb = bus[1][:, :, ::-1].copy()
    result = _explain_family(rtdetr.model, rgb, [48, 0])
    ref = copy.deepcopy(rtdetr).predict(bus[1], imgsz=IMGSZ, conf=0.0, max_det=50, verbose=False)[0]
    _compare_with_predict(result, ref, 4)
    # the target is the query's class logit: for the box's own class, the logit of its score
    assert abs(torch.tensor(result.targets[0].score).sigmoid().item() - result.detections[0][0].score) <= 1e-5
    assert sorted(camframe.Explainer(rtdetr.model).layers) == ["model.21", "model.24", "model.27"]
    check_adapter(rtdetr, [rgb], options={"conf": 0.0, "max_det": 1, "imgsz": 160})


def test_pseudo_class_errors_name_what_the_model_has():
    torch.manual_seed(0)
    image = np.zeros((64, 64, 3), np.uint8)
    pose = camframe.Explainer(camframe.load_model("yolov8n-pose.yaml"), options={"conf": 0.0, "imgsz": 64})
    with pytest.raises(camframe.CamframeError, match="kpt:left_eye"):
        pose([image], target=["kpt:tail"])
    with pytest.raises(camframe.CamframeError, match="kpt:nose"):
        pose([image], target=["mask"])


def test_classify_through_the_classifier_path(bus):
    rgb, square = bus
    yolo = _yolo("yolov8n-cls.yaml")
    before = _snapshot(yolo.model)
    ex = camframe.Explainer(yolo, options={"imgsz": 160})
    assert ex.adapter.name == "ultralytics-classify"
    result = ex([rgb])
    assert _unchanged(before, yolo.model)
    ref = copy.deepcopy(yolo).predict(bus[0][:, :, ::-1].copy(), imgsz=160, verbose=False)[0].probs
    with torch.no_grad():
        probs, logits = ex.model(ex.adapter.preprocess([rgb], ex.model)[0])
    assert torch.allclose(probs[0], ref.data, atol=1e-5)
    assert result.targets[0].class_id == ref.top1
    assert abs(result.targets[0].score - float(logits[0, ref.top1])) <= 1e-4
    heat = result.original()[0]
    assert tuple(heat.shape) == rgb.shape[:2]
    # the centre crop covers rows 135..945 of the 1080 x 810 photo; the map is zero outside it
    assert float(heat[:130].amax()) == 0 and float(heat[950:].amax()) == 0 and float(heat.amax()) > 0
    assert all(bool(r.any()) for r in result.reached.values())
    check_adapter(yolo, [square[:, :, ::-1].copy()], options={"imgsz": 160})


@pytest.mark.parametrize("yaml,target", [("yolov8n-seg.yaml", "mask"), ("yolov8n-pose.yaml", "kpt:nose"),
                                         ("yolov8n-obb.yaml", "0"), ("rtdetr-l.yaml", "0"),
                                         ("yolov8n-cls.yaml", None)])
def test_cli_layers_and_explain(yaml, target, bus, tmp_path):
    run = subprocess.run([sys.executable, "-m", "camframe", "layers", "--model", yaml],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    adapter = {"yolov8n-cls.yaml": "ultralytics-classify", "rtdetr-l.yaml": "ultralytics-rtdetr"}.get(yaml,
                                                                                                   "ultralytics")
    assert f"default layers of adapter '{adapter}'" in run.stdout
    image = tmp_path / "bus.jpg"
    cv2.imwrite(str(image), bus[1])
    args = ["--classes", target, "--conf", "0", "--boxes", "top:2"] if target else []
    run = subprocess.run([sys.executable, "-m", "camframe", "explain", str(image), "--model", yaml, "--imgsz", "160",
                          "--save-maps", "--quiet", "--out", str(tmp_path / "out"), *args],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    maps = sorted((tmp_path / "out").glob("*.box*.npy")) if target else sorted((tmp_path / "out").glob("*.npy"))
    assert len(maps) == (2 if target else 1) and all(target is None or target.replace(":", "_") in m.name for m in maps)
    if target:  # a detector also writes the image's overview map: the max of its boxes' maps
        overview = np.load(tmp_path / "out" / "bus.cam.npy")
        np.testing.assert_allclose(overview, np.maximum(*[np.load(m) for m in maps]), atol=1e-6)
        maps.append(tmp_path / "out" / "bus.cam.npy")
    assert all(np.load(m).shape == bus[1].shape[:2] for m in maps)
