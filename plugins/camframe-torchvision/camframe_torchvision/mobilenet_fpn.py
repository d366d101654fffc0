"""Faster R-CNN on a MobileNetV2 + FPN backbone (an architecture torchvision has no builder for),
and the no-argument factory of the shapes detector trained on it (``tests/assets/shapes_frcnn.pt``):

    camframe explain --model camframe_torchvision.mobilenet_fpn:shapes_frcnn \\
        --weights tests/assets/shapes_frcnn.pt IMAGE
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = ["SHAPES", "fasterrcnn_mobilenet_v2_fpn", "shapes_frcnn"]

SHAPES = ["__background__", "circle", "square", "triangle", "cross"]  # scripts/shapes.py's classes

# MobileNetV2 blocks ending the stride 8, 16 and 32 stages, and their channels
_RETURN = {"6": "0", "13": "1", "17": "2"}
_CHANNELS = [32, 96, 320]


def fasterrcnn_mobilenet_v2_fpn(num_classes: int, *, size: int = 256, fpn_channels: int = 128,
                                categories: list[str] | None = None,
                                backbone_weights: str | Path | None = None) -> FasterRCNN:
    """Faster R-CNN: MobileNetV2 (frozen BatchNorm) with an FPN over strides 8-32 (+ a max-pool
    level for the RPN), square anchors of two sizes per level, RoIAlign over strides 8-32, a
    256-wide box head; images resized to ``size`` (shorter and longer side). ``backbone_weights``:
    a torchvision ImageNet MobileNetV2 state dict file. ``categories`` (with ``__background__``
    first) is kept as ``model.categories``, where the camframe adapter reads class names."""
    body = mobilenet_v2(norm_layer=FrozenBatchNorm2d)
    if backbone_weights is not None:
        body.load_state_dict(torch.load(backbone_weights, map_location="cpu", weights_only=True))
    backbone = BackboneWithFPN(body.features, _RETURN, _CHANNELS, fpn_channels, extra_blocks=LastLevelMaxPool())
    anchors = AnchorGenerator(sizes=((16, 23), (32, 45), (64, 91), (128, 181)), aspect_ratios=((1.0,),) * 4)
    model = FasterRCNN(
        backbone, None, min_size=size, max_size=size, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_classes),
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300, box_batch_size_per_image=128)
    if categories is not None:
        model.categories = list(categories)
    return model


def shapes_frcnn() -> nn.Module:
    """The architecture of ``tests/assets/shapes_frcnn.pt`` (random weights; load them with ``--weights``)."""
    return fasterrcnn_mobilenet_v2_fpn(len(SHAPES), categories=SHAPES)
