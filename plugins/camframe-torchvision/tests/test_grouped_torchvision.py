"""Support grouping on torchvision detectors: RetinaNet's boxes (anchored) and the R-CNNs' (RoIAlign's
footprint, ``roi_footprint``) grouped with maps equal to one backward per box; each R-CNN target's own
gradient inside its footprint; a captured layer that is no FPN level RoIAlign reads: never grouped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign, roi_align

import camframe
from camframe.adapters import explaining
from camframe_torchvision import TorchvisionDetector
from camframe_torchvision.roi_footprint import roi_align_rect

IMAGE = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
# square (the image's border is the maps' border) and not (maps padded beyond it)
IMAGES = [np.random.default_rng(k).integers(0, 255, size, dtype=np.uint8)
          for k, size in enumerate([(320, 320, 3), (230, 320, 3)])]


def both(model, image=IMAGE, layers=None, **call) -> tuple:
    out = []
    for group in (False, True):
        with camframe.Explainer(model, layers=layers, group=group) as ex:
            out.append(ex([image], **call))
            counts = dict(ex.groups)
    return out[0], out[1], counts


def assert_same(a, b) -> None:
    assert [(t.class_id, t.detection.index) for t in a.targets] == [(t.class_id, t.detection.index) for t in b.targets]
    for name in a.layer_maps:
        peak = a.layer_maps[name].amax((1, 2)).clamp(min=1e-30)
        assert ((a.layer_maps[name] - b.layer_maps[name]).abs().amax((1, 2)) <= 1e-6 * peak).all(), name
        assert torch.equal(a.reached[name], b.reached[name])
    assert ((a.maps - b.maps).abs().amax((1, 2)) <= 1e-6 * a.maps.amax((1, 2)).clamp(min=1e-30)).all()


def rcnn(name: str, **kwargs):
    """A random two-stage model at 320 whose kept proposals spread over RoIAlign's four levels: no box
    regression (proposals are anchors, the 10 best of each size from 32 to 512; detections their
    proposals), RoIAlign's levels picked for sizes 32, 64, 128, 256 (as test_detection's)."""
    torch.manual_seed(0)
    settings = {"min_size": 320, "max_size": 320, "num_classes": 3, "rpn_pre_nms_top_n_test": 10,
                "box_score_thresh": 0.0, "box_detections_per_img": 30,
                "box_roi_pool": MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, canonical_scale=90), **kwargs}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **settings)
    for layer in (model.rpn.head.bbox_pred, model.roi_heads.box_predictor.bbox_pred):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


def test_retinanet_groups_with_equal_maps():
    torch.manual_seed(0)
    model = torchvision.models.get_model("retinanet_resnet50_fpn", weights=None, weights_backbone=None,
                                         min_size=512, max_size=512, topk_candidates=20, detections_per_img=40,
                                         score_thresh=0.0)
    a, b, counts = both(model)
    assert counts["targets"] == len(a.targets) == 40 and counts["backward passes"] < 40
    assert_same(a, b)


def test_faster_rcnn_groups_with_equal_maps():
    a, b, counts = both(rcnn("fasterrcnn_resnet50_fpn"), IMAGES[0])
    assert len({t.detection.extra["level"] for t in a.targets}) > 1
    assert counts["targets"] == len(a.targets) == 30 and counts["backward passes"] < 15
    assert_same(a, b)


@pytest.mark.parametrize("name, target", [("maskrcnn_resnet50_fpn", [1, "mask"]),
                                          ("keypointrcnn_resnet50_fpn", [1, "kpt:nose"])])
def test_mask_and_keypoint_rcnn_group_box_and_part_targets_with_equal_maps(name, target):
    model = rcnn(name, num_classes=2, box_detections_per_img=12)
    a, b, counts = both(model, IMAGES[0], target=target)
    assert {t.class_name for t in a.targets} == {"1" if name.startswith("mask") else "person", target[1]}
    assert counts["targets"] == len(a.targets) == 24 and counts["backward passes"] < 12
    assert_same(a, b)


@pytest.mark.parametrize("layers, grouped", [(["backbone.body.layer4"], False),
                                             (["backbone.fpn.layer_blocks.1", "backbone.body.layer3"], False),
                                             (["backbone.fpn.layer_blocks.1"], True)])
def test_only_fpn_levels_that_roialign_reads_bound_a_target(layers, grouped):
    """A layer before the FPN reaches a box through every convolution after it: no footprint bounds it,
    even beside an FPN level. An FPN level alone bounds every box (one at another level reaches none of it)."""
    a, b, counts = both(rcnn("fasterrcnn_resnet50_fpn", box_detections_per_img=12), IMAGES[0], layers=layers)
    assert counts["targets"] == len(a.targets) == 12
    assert (counts["backward passes"] < 12) == grouped
    assert_same(a, b)


def test_each_targets_own_gradient_lies_in_its_footprint():
    """One backward per target, straight through the model (no camframe capture): at every FPN level, the
    gradient of a box's logit or a mask's score is zero outside the footprint and nonzero inside it at the
    box's own level only; the default layers' outputs are the very maps RoIAlign reads."""
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2, canonical_scale=90)
    model = rcnn("maskrcnn_resnet50_fpn", box_detections_per_img=40, mask_roi_pool=pool)
    adapter = TorchvisionDetector()
    wrapper = adapter.prepare(model)
    layers = adapter.layers(wrapper)
    assert layers == [f"backbone.fpn.layer_blocks.{i}" for i in range(4)]
    seen: dict = {}
    hooks = [wrapper.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in layers]
    with explaining(wrapper):
        x, metas = adapter.preprocess(IMAGES, wrapper)
        try:
            outputs = wrapper(x.requires_grad_())
        finally:
            for h in hooks:
                h.remove()
        names = list(outputs["features"])
        assert all(seen[n] is outputs["features"][names[i]] for i, n in enumerate(layers))
        detections = adapter.detect(outputs, metas, wrapper)
        targets = adapter.targets(outputs, detections, None, None, wrapper)
        targets += adapter.targets(outputs, detections, adapter.resolve_classes(["mask"], wrapper), None, wrapper)
        shapes = {n: tuple(seen[n].shape[-2:]) for n in layers}
        border, levels, area = 0, set(), []
        for t in targets:
            footprint = adapter.footprint(t, outputs, shapes)
            assert footprint is not None and set(footprint) == set(layers)
            assert sum(r is not None for r in footprint.values()) == 1
            score = adapter.score(outputs, [t]).sum()
            grads = torch.autograd.grad(score, [seen[n] for n in layers], retain_graph=True, allow_unused=True)
            for n, g in zip(layers, grads):
                reach = torch.zeros(shapes[n], dtype=torch.bool) if g is None else g[t.image].abs().sum(0) != 0
                inside = torch.zeros_like(reach)
                if footprint[n] is not None:
                    y0, y1, x0, x1 = footprint[n]
                    inside[y0:y1 + 1, x0:x1 + 1] = True
                    assert reach.any() or t.class_id < 0, (t, n)  # a mask with no positive logit: score 0
                    levels.add(n)
                    area.append((y1 - y0 + 1) * (x1 - x0 + 1) / reach.numel())
                assert not (reach & ~inside).any(), (t, n, footprint[n])
                assert g is None or not g[[i for i in range(len(x)) if i != t.image]].any()
            box = t.detection.extra["roi" if t.class_id >= 0 else "input_box"]
            h, w = t.detection.extra["resized"]
            border += min(box[0], box[1]) <= 0 or box[2] >= w or box[3] >= h
    assert len(targets) > 100 and levels == set(layers) and border >= 10 and np.median(area) < 0.2


def test_roi_align_rect_bounds_torchvisions_roi_align():
    """Against torchvision's own ``roi_align`` (its gradient on a map of ones): every tap inside the
    rectangle, which is at most one row or column wider on each side; boxes of all sizes, beyond the map
    too, sampling ratios fixed and adaptive."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(600):
        h, w = (int(v) for v in torch.randint(3, 40, (2,), generator=gen))
        scale = 2.0 ** -int(torch.randint(0, 5, (), generator=gen))
        x1, x2 = sorted((torch.rand(2, generator=gen) * w / scale * 1.1).tolist())
        y1, y2 = sorted((torch.rand(2, generator=gen) * h / scale * 1.1).tolist())
        if trial % 3 == 0:  # small boxes (RoIAlign widens them to one cell)
            x2, y2 = x1 + (x2 - x1) / 20, y1 + (y2 - y1) / 20
        if trial % 5 == 0:  # on the border
            x1, y2 = 0.0, h / scale
        ratio, size = [0, 2, -1, 1][trial % 4], [(7, 7), (14, 14), (3, 5)][trial % 3]
        ones = torch.ones(1, 1, h, w, requires_grad=True)
        pooled = roi_align(ones, [torch.tensor([[x1, y1, x2, y2]])], size, spatial_scale=scale, sampling_ratio=ratio)
        (g,) = torch.autograd.grad(pooled.sum(), ones)
        reach = g[0, 0] != 0
        rect = roi_align_rect((x1, y1, x2, y2), scale, size, ratio, (h, w))
        if rect is None:
            assert not reach.any(), trial
            continue
        ys, xs = reach.any(1).nonzero()[:, 0], reach.any(0).nonzero()[:, 0]
        assert len(ys), trial
        exact = (int(ys[0]), int(ys[-1]), int(xs[0]), int(xs[-1]))
        assert rect[0] <= exact[0] and rect[1] >= exact[1] and rect[2] <= exact[2] and rect[3] >= exact[3], trial
        assert max(exact[0] - rect[0], rect[1] - exact[1], exact[2] - rect[2], rect[3] - exact[3]) <= 1, trial


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn"])
def test_photo_groups_with_equal_maps(name):
    """A photo (scikit-image's coffee.png, 400×600) through torchvision's own configuration, weights random."""
    skimage_data = pytest.importorskip("skimage.data")
    torch.manual_seed(0)
    keep = ({"score_thresh": 0.0, "detections_per_img": 30} if name.startswith("retina")
            else {"box_score_thresh": 0.0, "box_detections_per_img": 30})
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, min_size=400, max_size=600,
                                         **keep)
    a, b, counts = both(model, skimage_data.coffee())
    assert counts["at least"] <= counts["backward passes"] < counts["targets"] == len(a.targets) == 30
    assert_same(a, b)
