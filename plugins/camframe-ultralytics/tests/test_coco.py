"""The real COCO YOLO11n / YOLO11n-seg rebuilt from Ultralytics' ONNX exports equal the ONNX models."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
import ultralytics
from ultralytics.utils.ops import scale_boxes

import camframe
from camframe.core.boxes import pair_iou

ASSETS = os.path.join(os.path.dirname(ultralytics.__file__), "assets")


@pytest.mark.parametrize("name,photo,expected", [
    ("yolo11n", "bus.jpg", {"bus": 1, "person": 4}),
    ("yolo11n", "zidane.jpg", {"person": 2, "tie": 1}),
    ("yolo11n-seg", "bus.jpg", {"bus": 1, "person": 4}),
])
def test_rebuilt_model_equals_onnx(coco_yolo11n, name, photo, expected):
    import yolo11n_coco

    model = camframe.load_model(str(coco_yolo11n[name]))
    assert len(model.names) == 80 and model.names[0] == "person"
    ex = camframe.Explainer(model, options={"rect": False})  # the ONNX export's input is the 640 square
    result = ex([os.path.join(ASSETS, photo)], boxes="all")
    dets = result.detections[0]
    # the ONNX export carries its own NMS (conf 0.25, iou 0.7): rows (x1, y1, x2, y2, score, class), zero-padded
    session = ort.InferenceSession(str(yolo11n_coco.onnx_path(name)))
    rows = session.run(None, {"images": result.inputs.numpy()})[0][0]
    rows = rows[rows[:, 4] > 0.25]
    rows = rows[np.argsort(-rows[:, 4])]
    boxes = scale_boxes(result.inputs.shape[-2:], torch.tensor(rows[:, :4]), result.metas[0]["size"]).tolist()
    assert len(dets) == len(rows)
    for d, row, box in zip(dets, rows, boxes):
        assert d.class_id == int(row[5])
        assert abs(d.score - float(row[4])) <= 5e-6
        assert pair_iou(d.box, box) >= 0.9999
    counts: dict[str, int] = {}
    for d in dets:
        counts[d.class_name] = counts.get(d.class_name, 0) + 1
    assert counts == expected
    # every box's map of the real model peaks inside its own box
    for t, heat in zip(result.targets, result.original()):
        y, x = divmod(int(heat.argmax()), heat.shape[1])
        x1, y1, x2, y2 = t.detection.box
        assert x1 - 8 <= x <= x2 + 8 and y1 - 8 <= y <= y2 + 8, (t.class_name, t.detection.box, (x, y))


@pytest.mark.parametrize("conf,max_det", [(0.001, 5), (0.001, 300), (0.0, 20)])
def test_nms_on_the_best_anchors_first_equals_nms_on_all(coco_yolo11n, monkeypatch, conf, max_det):
    """NMS runs on the 4 × max_det best-scoring anchors first (then 16 ×, ...); the kept boxes equal one
    NMS over every anchor, whether the first prefix keeps enough boxes or it has to grow."""
    from camframe_ultralytics import _adapter

    model = camframe.load_model(str(coco_yolo11n["yolo11n"]))
    ex = camframe.Explainer(model, options={"conf": conf, "max_det": max_det, "rect": False}, guided=False)
    calls: list[int] = []
    with ex:
        x, metas = ex.preprocess([os.path.join(ASSETS, p) for p in ("bus.jpg", "zidane.jpg")])
        with torch.no_grad():
            outputs = ex.model(x)
        import ultralytics.utils.nms as unms

        real = unms.non_max_suppression
        monkeypatch.setattr(unms, "non_max_suppression",
                            lambda p, *a, **k: calls.append(p.shape[-1]) or real(p, *a, **k))
        fast = ex.adapter.detect(outputs, metas, ex.model)
        monkeypatch.setattr(_adapter, "PREFIX", 10**9)
        full = ex.adapter.detect(outputs, metas, ex.model)
    anchors = x.shape[-2] * x.shape[-1] // 64 + x.shape[-2] * x.shape[-1] // 256 + x.shape[-2] * x.shape[-1] // 1024
    assert min(calls) < anchors  # the prefix ran
    for a, b in zip(fast, full):
        assert len(a) == len(b) == min(max_det, len(b)) and len(b) > 0
        assert [(d.index, d.class_id, d.score, d.box) for d in a] == [(d.index, d.class_id, d.score, d.box) for d in b]
