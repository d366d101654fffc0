"""torchvision detectors box by box: the model's own detections, one map per box (and per mask or
keypoint target), gradients to every default pyramid level, the model given back unchanged.

Random-weight models (seeded) at a small input size, built with low thresholds so that they detect
something on every pyramid level: a two-stage model regresses no box (its proposals are anchors of
every size), has one class and no NMS, and RoIAlign's canonical scale is lowered to fit small
images; RetinaNet and FCOS keep one candidate per level; each SSD level gets one class it favours.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

import camframe
from camframe import CamframeError
from camframe.cli import main
from camframe.adapters.state import explaining
from camframe.testing import check_adapter

SMALL = {"min_size": 256, "max_size": 320}
# two-stage: a few proposals per anchor size (RPN level), each one a detection (one class, no NMS)
RCNN = {**SMALL, "num_classes": 2, "rpn_pre_nms_top_n_test": 3, "box_score_thresh": 0.0, "box_nms_thresh": 1.0}
ONE_STAGE = {"topk_candidates": 1, "detections_per_img": 8}
FAMILIES: dict[str, dict[str, Any]] = {
    "fasterrcnn_resnet50_fpn": RCNN,
    "fasterrcnn_resnet50_fpn_v2": RCNN,
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"box_score_thresh": 0.001, "box_detections_per_img": 8},
    "maskrcnn_resnet50_fpn": RCNN,
    "keypointrcnn_resnet50_fpn": RCNN,
    "retinanet_resnet50_fpn": {**SMALL, **ONE_STAGE, "score_thresh": 0.005},
    "fcos_resnet50_fpn": {**SMALL, **ONE_STAGE, "score_thresh": 0.05},
    "ssd300_vgg16": {**ONE_STAGE, "score_thresh": 0.001},
    "ssdlite320_mobilenet_v3_large": {**ONE_STAGE, "score_thresh": 0.001},
}
IMAGES = [np.random.default_rng(k).integers(0, 255, size, dtype=np.uint8)
          for k, size in enumerate([(200, 260, 3), (240, 180, 3)])]


def _favour_levels(model: nn.Module) -> None:
    """SSD: raise class ``l + 1``'s prior on level ``l``, so that every level has a detection."""
    head = model.head.classification_head
    for level, block in enumerate(head.module_list):
        conv = [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1]
        with torch.no_grad():
            conv.bias.view(-1, head.num_columns)[:, level + 1] += 100  # above any random logit


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(FAMILIES[name])
    if name.startswith(("fasterrcnn_resnet", "maskrcnn", "keypointrcnn")):
        # anchor sizes 32, 64, 128, 256 in the middle of RoIAlign's levels 0..3
        kwargs["box_roi_pool"] = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, canonical_scale=90)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs)
    if "box_roi_pool" in kwargs:  # no box regression: proposals are anchors, detections proposals
        for layer in (model.rpn.head.bbox_pred, model.roi_heads.box_predictor.bbox_pred):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    if name.startswith("ssd"):
        _favour_levels(model)
    return model


def _own_output(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """``model.eval()(images)``, the model's flags put back after."""
    with explaining(model), torch.no_grad():
        return model([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in IMAGES])


@lru_cache(maxsize=None)
def explained(name: str) -> tuple[nn.Module, list[dict], camframe.Result, dict[str, Any]]:
    """The model (in training mode, part of it frozen), its own eval output, ``check_adapter``'s
    result, and the model's state from before."""
    model = build(name)
    own = _own_output(model)
    next(model.parameters()).requires_grad_(False)
    model.backbone.eval()
    before = {"state": {k: v.clone() for k, v in model.state_dict().items()},
              "training": {n: m.training for n, m in model.named_modules()},
              "grad": {n: p.requires_grad for n, p in model.named_parameters()}}
    return model, own, check_adapter(model, IMAGES), before


@pytest.mark.parametrize("name", FAMILIES)
def test_detections_are_the_models_own_eval_output(name):
    _, own, result, _ = explained(name)
    assert result.adapter.name == "torchvision-detection"
    for dets, ref in zip(result.detections, own):
        assert len(ref["boxes"]) > 0
        assert torch.equal(torch.tensor([d.box for d in dets]), ref["boxes"])
        assert torch.equal(torch.tensor([d.score for d in dets]), ref["scores"])
        assert [d.class_id for d in dets] == ref["labels"].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_every_kept_box_gets_its_own_map_of_the_original_image(name):
    _, _, result, _ = explained(name)
    boxes = [(b, k) for b, dets in enumerate(result.detections) for k in range(len(dets))]
    assert [(t.image, t.box) for t in result.targets] == boxes
    assert all(t.class_id == t.detection.class_id for t in result.targets)
    for u, (t, heat) in enumerate(zip(result.targets, result.original())):
        assert heat.shape == IMAGES[t.image].shape[:2]
        assert any(bool(reached[u]) for reached in result.reached.values())  # from the box's own gradient


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_reach_every_default_layer_and_the_model_comes_back_unchanged(name):
    model, _, result, before = explained(name)
    assert set(result.reached) == set(camframe.Explainer(model).layers)
    assert all(bool(reached.any()) for reached in result.reached.values())
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())
    assert {n: m.training for n, m in model.named_modules()} == before["training"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["grad"]
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


def test_one_stage_target_is_the_logit_of_the_kept_anchor():
    _, _, result, _ = explained("retinanet_resnet50_fpn")
    for t in result.targets:  # RetinaNet's confidence is the sigmoid of that very logit
        assert torch.sigmoid(torch.tensor(t.score)).item() == pytest.approx(t.detection.score, rel=1e-5)


def test_two_stage_target_is_the_box_heads_logit_for_the_kept_proposal():
    model, _, result, _ = explained("fasterrcnn_resnet50_fpn")
    t = result.targets[0]
    heads = model.roi_heads
    with explaining(model), torch.no_grad():
        features = model.backbone(result.inputs[t.image:t.image + 1])
        rois = [torch.tensor([t.detection.extra["roi"]])]
        sizes = [tuple(t.detection.extra["resized"])]
        logits, _ = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, rois, sizes)))
    assert logits[0].softmax(0)[t.class_id].item() == pytest.approx(t.detection.score, rel=1e-4)
    assert logits[0, t.class_id].item() == pytest.approx(t.score, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_masks_and_keypoints_are_the_models_own_in_original_pixels(name):
    """``extra["mask"]`` (outline polygons) fills the model's own eval mask (> 0.5); ``extra["keypoints"]``
    are its keypoints: both on the original image, as the manifest and ``*.detections.jpg`` take them."""
    import cv2

    _, own, result, _ = explained(name)
    filled = 0
    for dets, ref, image in zip(result.detections, own, IMAGES):
        assert len(dets) == len(ref["boxes"]) > 0
        for k, d in enumerate(dets):
            if "masks" in ref:
                theirs = ref["masks"][k, 0].numpy() > 0.5
                mine = np.zeros(image.shape[:2], np.uint8)
                cv2.fillPoly(mine, [np.array(p, np.int32) for p in d.extra["mask"]], 1)
                union = (mine.astype(bool) | theirs).sum()
                assert union == 0 or (mine.astype(bool) & theirs).sum() / union >= 0.9, (k, union)
                filled += int(theirs.sum() > 0)
            else:
                np.testing.assert_allclose(np.array(d.extra["keypoints"]), ref["keypoints"][k, :, :2].numpy(),
                                           atol=0.01)
                filled += 1
    assert filled > 0


def test_mask_target_maps_each_instance():
    model, _, _, _ = explained("maskrcnn_resnet50_fpn")
    result = camframe.Explainer(model)(IMAGES, target=["mask"], boxes="top:3")
    assert [t.class_name for t in result.targets] == ["mask"] * 6
    assert [t.box for t in result.targets] == [0, 1, 2] * 2
    for t, heat in zip(result.targets, result.original()):
        assert heat.shape == IMAGES[t.image].shape[:2] and np.isfinite(t.score)
    assert any(bool(r.any()) for r in result.reached.values())


def test_keypoint_targets_one_per_keypoint():
    model, _, _, _ = explained("keypointrcnn_resnet50_fpn")
    names = torchvision.models.detection.KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.meta["keypoint_names"]
    ex = camframe.Explainer(model)
    assert ex.adapter.resolve_classes(["kpt:nose", "kpt:16", -17, "1"], ex.model) == [-1, -17, -17, 1]
    result = ex(IMAGES[:1], target=["kpt:nose", "kpt:right_ankle"], boxes="top:2")
    assert [(t.box, t.class_name) for t in result.targets] == \
        [(0, "kpt:nose"), (0, f"kpt:{names[-1]}"), (1, "kpt:nose"), (1, f"kpt:{names[-1]}")]
    assert all(m.shape == IMAGES[0].shape[:2] for m in result.original())
    assert len({round(t.score, 6) for t in result.targets}) == 4
    # the class is Keypoint R-CNN's own "person" (its weights' categories), not "1"; a 2-class Faster R-CNN's is "1"
    meta = torchvision.models.detection.KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert ex.adapter.class_names(ex.model) == meta == ["no person", "person"]
    assert ex.adapter.resolve_classes(["person"], ex.model) == [1]
    assert {t.class_name for t in ex(IMAGES[:1], boxes="top:2").targets} == {"person"}
    faster = camframe.Explainer(explained("fasterrcnn_resnet50_fpn")[0])
    assert faster.adapter.class_names(faster.model) == ["0", "1"]


def test_class_names_and_pseudo_classes():
    model, _, _, _ = explained("fasterrcnn_mobilenet_v3_large_320_fpn")
    ex = camframe.Explainer(model)
    meta = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert ex.adapter.class_names(ex.model) == meta and ex.adapter.resolve_classes(["dog"], ex.model) == [18]
    with pytest.raises(CamframeError, match="unknown class 'mask'"):
        ex(IMAGES, target=["mask"])
    other = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert camframe.Explainer(other).adapter.class_names(None) == ["0", "1", "2"]


def test_options_default_to_the_models_own_and_are_checked():
    model, _, _, _ = explained("fcos_resnet50_fpn")
    assert camframe.Explainer(model).adapter.options == {"conf": 0.05, "iou": 0.6, "max_det": 8}
    assert camframe.Explainer(model, options={"conf": 0.3}).adapter.options["conf"] == 0.3
    for bad in ({"conf": 2}, {"iou": -0.1}, {"max_det": 0}):
        with pytest.raises(CamframeError, match=next(iter(bad))):
            camframe.Explainer(model, options=bad)


@pytest.mark.parametrize("name", FAMILIES)
def test_cli_lists_each_familys_layers(name, capsys):
    assert main(["layers", "--model", name, "--weights", "random"]) == 0
    out = capsys.readouterr().out
    assert "default layers of adapter 'torchvision-detection'" in out
    assert "* backbone." in out


def test_cli_explains_each_box_on_the_original_image(tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray(IMAGES[0]).save(path)
    torch.manual_seed(0)
    argv = ["explain", str(path), "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "random",
            "--conf", "0.001", "-O", "max_det=3", "--save-maps", "--quiet", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    (entry,) = json.loads((tmp_path / "out" / "manifest.json").read_text())["images"]
    assert [e["box_index"] for e in entry["explanations"]] == [0, 1, 2]
    for e in entry["explanations"]:
        assert np.load(tmp_path / "out" / e["files"]["map"]).shape == IMAGES[0].shape[:2]


def test_load_model_with_weights_file(tmp_path):
    torch.manual_seed(1)
    saved = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None)
    torch.save(saved.state_dict(), tmp_path / "ssdlite.pth")
    model = camframe.load_model("ssdlite320_mobilenet_v3_large", str(tmp_path / "ssdlite.pth"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
