"""Support grouping on torchvision detectors: RetinaNet's boxes grouped with maps equal to one backward
per box; Faster R-CNN's (RoI heads: no anchor cell) never grouped, maps unchanged."""

from __future__ import annotations

import numpy as np
import torch
import torchvision

import camframe

IMAGE = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)


def both(model) -> tuple:
    out = []
    for group in (False, True):
        with camframe.Explainer(model, group=group) as ex:
            out.append(ex([IMAGE]))
            counts = dict(ex.groups)
    return out[0], out[1], counts


def assert_same(a, b) -> None:
    assert [(t.class_id, t.detection.index) for t in a.targets] == [(t.class_id, t.detection.index) for t in b.targets]
    for name in a.layer_maps:
        peak = a.layer_maps[name].amax((1, 2)).clamp(min=1e-30)
        assert ((a.layer_maps[name] - b.layer_maps[name]).abs().amax((1, 2)) <= 1e-6 * peak).all(), name
        assert torch.equal(a.reached[name], b.reached[name])
    assert ((a.maps - b.maps).abs().amax((1, 2)) <= 1e-6 * a.maps.amax((1, 2)).clamp(min=1e-30)).all()


def test_retinanet_groups_with_equal_maps():
    torch.manual_seed(0)
    model = torchvision.models.get_model("retinanet_resnet50_fpn", weights=None, weights_backbone=None,
                                         min_size=512, max_size=512, topk_candidates=20, detections_per_img=40,
                                         score_thresh=0.0)
    a, b, counts = both(model)
    assert counts["targets"] == len(a.targets) == 40 and counts["backward passes"] < 40
    assert_same(a, b)


def test_faster_rcnn_is_never_grouped():
    torch.manual_seed(0)
    model = torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None,
                                         min_size=320, max_size=320, num_classes=3, rpn_pre_nms_top_n_test=20,
                                         box_score_thresh=0.0, box_detections_per_img=10)
    a, b, counts = both(model)
    assert counts["targets"] == counts["backward passes"] == len(a.targets) > 1
    assert_same(a, b)
