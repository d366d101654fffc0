"""The YOLO adapter on the synthetic shapes detector (right answers known) and on yaml-built models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ultralytics import YOLO

import camframe
from camframe.evaluation.harness import score_result

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from evaluate import ultralytics_visualize  # noqa: E402


def test_detections_equal_ultralytics_predict(shapes_weights, shapes_model, heldout):
    """On non-square crops (320 x 240, 200 x 320): predict()'s rectangular letterbox, not the square."""
    yolo = YOLO(str(shapes_weights))
    ex = camframe.Explainer(shapes_model)
    compared = 0
    for i, (whole, _, _) in enumerate(heldout[:8]):
        rgb = np.ascontiguousarray(whole[:, 40:280] if i % 2 else whole[60:260])
        bgr = rgb[:, :, ::-1].copy()
        assert ex.preprocess([rgb])[0].shape[-2:] == ((256, 192) if i % 2 else (160, 256))
        dets = ex([rgb]).detections[0]
        ref = yolo.predict(bgr, verbose=False)[0].boxes
        assert len(dets) == len(ref)
        for d, box, conf, cls in zip(dets, ref.xyxy.numpy(), ref.conf.numpy(), ref.cls.numpy()):
            assert np.abs(np.array(d.box) - box).max() <= 1.0
            assert abs(d.score - conf) <= 1e-4
            assert d.class_id == int(cls)
            compared += 1
        # the target (the class logit at the box's anchor, read from its level) is the box's score
        for t in ex([rgb]).targets:
            assert abs(torch.sigmoid(torch.tensor(t.score)).item() - t.detection.score) <= 1e-4
    assert compared >= 16


def test_per_box_maps_point_at_their_own_box(shapes_model, heldout):
    """Pointing ≥ 90 %, mean EBPG ≥ 0.5, and less mass on other objects than image-level maps give:
    all boxes' maps merged, and Ultralytics' own predict(visualize=True) map."""
    rows: list[dict] = []
    image_level: dict[str, list[dict]] = {"merged": [], "ultralytics": []}
    with camframe.Explainer(shapes_model) as ex:
        for rgb, _, truth in heldout:
            result = ex([rgb])
            rows += score_result(ex, result, [truth], deletion=False)
            per_box = result.maps
            for name, whole in (("merged", per_box.amax(0)), ("ultralytics", ultralytics_visualize(ex, result)[0])):
                result.maps = whole[None].expand(len(result.targets), -1, -1)
                image_level[name] += score_result(ex, result, [truth], deletion=False)
    matched = [r for r in rows if r["matched"]]
    assert len(matched) >= 30
    pointing = np.mean([r["pointing"] for r in matched])
    ebpg = np.mean([r["ebpg"] for r in matched])
    disc = np.nanmean([r["discrimination"] for r in matched])
    assert pointing >= 0.9, pointing
    assert ebpg >= 0.5, ebpg
    for name, other in image_level.items():
        disc_image = np.nanmean([r["discrimination"] for r in other if r["matched"]])
        assert disc < disc_image / 5, (name, disc, disc_image)


def test_each_class_and_box_side_is_a_target(shapes_model, heldout):
    rgb = heldout[0][0]
    ex = camframe.Explainer(shapes_model)
    result = ex([rgb], target=["circle", "square", "box.left"], boxes="top:2")
    assert [(t.box, t.class_name) for t in result.targets] == [
        (0, "circle"), (0, "square"), (0, "box.left"), (1, "circle"), (1, "square"), (1, "box.left")]
    assert all(torch.isfinite(torch.tensor(t.score)) for t in result.targets)
    # a box's map for another class differs from the one for its own class
    assert not torch.allclose(result.maps[0], result.maps[1])
    assert ex([rgb], boxes=[1]).targets[0].box == 1


def test_batch_equals_single_images_and_batched_vjp_equals_loop(shapes_model, heldout):
    images = [heldout[0][0], heldout[1][0]]
    with camframe.Explainer(shapes_model) as ex:
        both = ex(images)
        alone = torch.cat([ex([im]).maps for im in images])
    with camframe.Explainer(shapes_model, grad_batch=4) as ex4:
        vectorised = ex4(images).maps
    assert torch.allclose(both.maps, alone, atol=1e-4)
    assert torch.allclose(vectorised, both.maps, atol=1e-4)


def test_guided_per_box_through_silu(shapes_model, heldout):
    result = camframe.Explainer(shapes_model, guided=True)([heldout[0][0]], boxes="top:2")
    assert result.guided is not None and result.guided.shape == (2, 3, 256, 256)
    assert result.guided.abs().sum() > 0
    assert not torch.allclose(result.guided[0], result.guided[1])


@pytest.mark.parametrize("yaml", ["yolov5nu.yaml", "yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolov8n-seg.yaml"])
def test_model_families_run_end_to_end(yaml):
    torch.manual_seed(0)
    model = camframe.load_model(yaml)
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    result = camframe.Explainer(model, options={"conf": 0.0, "max_det": 8, "imgsz": 256})([image])
    assert len(result.targets) == 8 and result.maps.shape == (8, 192, 256)  # predict()'s letterbox of 200 x 300
    assert [m.shape for m in result.original()] == [(200, 300)] * 8
    for layer, reached in result.reached.items():
        assert reached.any(), f"{yaml}: no box reaches {layer}"


def test_end_to_end_head_one_to_one_branch_reaches_the_neck():
    model = camframe.load_model("yolo26n.yaml")
    image = np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    ex = camframe.Explainer(model, options={"conf": 0.0, "max_det": 4, "imgsz": 256, "nms": False})
    result = ex([image])
    assert ex.adapter.end2end and len(result.targets) == 4
    assert all(bool(r.any()) for r in result.reached.values())
    assert all(float(m.amax()) > 0 for m in result.layer_maps.values())


def test_user_model_left_untouched(shapes_weights, heldout):
    yolo = YOLO(str(shapes_weights))
    inner = yolo.model
    before = {n: (m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
              for n, m in inner.named_modules()}
    grads = [p.requires_grad for p in inner.parameters()]
    values = [p.detach().clone() for p in inner.parameters()]
    n_modules = len(list(inner.modules()))
    camframe.Explainer(yolo, guided=True)([heldout[0][0]])
    assert yolo.trainer is None  # no training run was started
    assert {n: (m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in inner.named_modules()} == before
    assert [p.requires_grad for p in inner.parameters()] == grads
    assert all(torch.equal(a, b) for a, b in zip(values, inner.parameters()))
    assert len(list(inner.modules())) == n_modules  # not fused
    assert all(p.grad is None for p in inner.parameters())


def test_model_from_predict_with_inference_tensors(shapes_weights, heldout):
    """predict() fuses AutoBackend's copy and caches anchors as inference tensors; explaining still works."""
    yolo = YOLO(str(shapes_weights))
    yolo.predict(heldout[0][1], verbose=False)
    with torch.inference_mode():
        result = camframe.Explainer(yolo)([heldout[0][0]])
    assert len(result.targets) >= 2 and float(result.maps.amax()) == 1.0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camframe", *args], capture_output=True, text=True)


def test_cli_writes_per_box_files_and_manifest(shapes_weights, heldout, tmp_path):
    image = tmp_path / "img.jpg"
    cv2.imwrite(str(image), heldout[0][1])
    out = tmp_path / "out"
    run = _cli("explain", str(image), "--model", str(shapes_weights), "--save-maps", "--guided", "--quiet",
               "--out", str(out))
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["images"][0]
    assert (out / entry["overview"]).is_file()
    assert len(entry["detections"]) == len(entry["explanations"]) >= 2
    for k, (det, exp) in enumerate(zip(entry["detections"], entry["explanations"])):
        assert {"box", "class_id", "class_name", "detection_score", "model_index"} <= set(det)
        assert "stride" in det["adapter_extra"]
        assert (exp["box_index"], exp["class_id"]) == (k, det["class_id"])
        assert exp["detection_score"] == det["detection_score"]
        assert exp["target_score_kind"] == "logit" and exp["supported"] is True  # the box's own class
        assert exp["target_score"] == pytest.approx(math.log(det["detection_score"] / (1 - det["detection_score"])),
                                                    abs=1e-3)  # its confidence is the sigmoid of its logit
        name = f"img.box{k}.c{det['class_id']}-{det['class_name']}"
        assert exp["files"] == {"cam": f"{name}.cam.jpg", "guided-backprop": f"{name}.guided-backprop.jpg",
                                "guided-gradcam": f"{name}.guided-gradcam.jpg", "map": f"{name}.cam.npy"}
        heat = np.load(out / exp["files"]["map"])
        assert heat.shape == heldout[0][1].shape[:2] and heat.dtype == np.float32
        assert 0 <= heat.min() and heat.max() <= 1


def test_cli_image_without_detections_gets_an_overview_and_the_run_goes_on(shapes_weights, heldout, tmp_path):
    image, shapes = tmp_path / "blank.png", tmp_path / "shapes.png"
    cv2.imwrite(str(image), np.full((120, 160, 3), 127, np.uint8))
    cv2.imwrite(str(shapes), heldout[0][1])
    run = _cli("explain", str(image), str(shapes), "--model", str(shapes_weights), "--quiet",
               "--out", str(tmp_path / "o"))
    assert run.returncode == 0, run.stderr
    assert f"{image}: no detections" in run.stderr
    blank, other = json.loads((tmp_path / "o" / "manifest.json").read_text())["images"]
    assert blank["detections"] == blank["explanations"] == [] and (tmp_path / "o" / "blank.detections.jpg").is_file()
    assert other["explanations"]


def test_cli_unknown_class_lists_model_names(shapes_weights, heldout, tmp_path):
    image = tmp_path / "img.jpg"
    cv2.imwrite(str(image), heldout[0][1])
    run = _cli("explain", str(image), "--model", str(shapes_weights), "--classes", "hexagon", "--quiet",
               "--out", str(tmp_path / "o"))
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and "circle, square, triangle, cross" in run.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_missing_checkpoint_error_mentions_download(tmp_path):
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    run = _cli("explain", str(image), "--model", "yolov8n.pt", "--quiet", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "download" in run.stderr and run.stderr.count("\n") == 1
