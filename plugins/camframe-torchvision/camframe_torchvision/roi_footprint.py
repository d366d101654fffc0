"""Where a two-stage detector's RoI head reads the FPN, by arithmetic (``Adapter.footprint``).

A box-class target's score is the box head's logit for its RoI (a constant: RPN proposals are
detached), read through ``MultiScaleRoIAlign`` at one FPN level, the level mapper's pick, then a
per-RoI head; a ``mask`` or keypoint target's likewise through its own pool over the detected box.
Each ``backbone.fpn.layer_blocks.<i>`` output *is* FPN level ``i``, used downstream only by that
RoIAlign and by the RPN (whose proposals are detached); so at those layers the target's gradient
lies inside RoIAlign's sampling footprint of its RoI at its level, and is zero at the others.
Anything else (another captured layer, a pooled level the FPN's extra block makes, a head or pool
of an unknown type) bounds nothing: ``footprint`` returns None.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from camframe.adapters import Rect, Target

__all__ = ["roi_align_rect", "rcnn_footprint"]

EPS = 1e-3  # cells: sampling points this close to a cell's edge take the next row or column too (float rounding)
_EXTRA = {type(None): 0, LastLevelMaxPool: 1, LastLevelP6P7: 2}  # levels an FPN's extra block appends
_HEADS = {  # per branch: its RoI pool, its per-RoI head and predictor (attribute names, known types), the box pooled
    "box": ("box_roi_pool", ("box_head", TwoMLPHead, FastRCNNConvFCHead), ("box_predictor", FastRCNNPredictor), "roi"),
    "mask": ("mask_roi_pool", ("mask_head", MaskRCNNHeads), ("mask_predictor", MaskRCNNPredictor), "input_box"),
    "keypoint": ("keypoint_roi_pool", ("keypoint_head", KeypointRCNNHeads),
                 ("keypoint_predictor", KeypointRCNNPredictor), "input_box"),
}


def _span(start: float, end: float, scale: float, bins: int, ratio: int, size: int) -> tuple[int, int] | None:
    """The first and last row (column) of a map of ``size`` rows that torchvision's ``roi_align``
    (``aligned=False``) taps for an RoI from ``start`` to ``end`` (input pixels); None if none."""
    lo = start * scale
    length = max(end * scale - lo, 1.0)
    grid = ratio if ratio > 0 else math.ceil(length / bins * (1 + 1e-6))  # the larger count where rounding decides
    step = length / bins / grid
    first, last = lo + step / 2, lo + length - step / 2  # every sample lies between them
    first, last = max(first - EPS, -1.0), min(last + EPS, float(size))  # samples beyond -1 or size are skipped
    if first > last:
        return None
    # a sample y (clamped at 0) taps rows floor(y) and floor(y) + 1, both clamped to the last row
    return min(math.floor(max(first, 0.0)), size - 1), min(math.floor(max(last, 0.0)) + 1, size - 1)


def roi_align_rect(box: Sequence[float], scale: float, output_size: Sequence[int], sampling_ratio: int,
                   size: tuple[int, int]) -> Rect | None:
    """The rectangle of an ``(h, w)`` map that ``roi_align(..., spatial_scale=scale, aligned=False)``
    reads for ``box`` (xyxy, input pixels): every bilinear tap of every sampling point; None if it
    reads none of it."""
    rows = _span(box[1], box[3], scale, output_size[0], sampling_ratio, size[0])
    cols = _span(box[0], box[2], scale, output_size[1], sampling_ratio, size[1])
    return None if rows is None or cols is None else (*rows, *cols)


def _levels(model: nn.Module, features: Mapping[str, Any], pool: MultiScaleRoIAlign,
            shapes: Mapping[str, tuple[int, int]]) -> list[str | None] | None:
    """Per level ``pool`` reads, the captured layer that is that FPN level (None: not captured); None
    unless every captured layer is an FPN level the pool reads, exactly."""
    backbone = getattr(model, "backbone", None)
    if type(backbone) is not BackboneWithFPN or type(backbone.fpn) is not FeaturePyramidNetwork:
        return None
    fpn, names = backbone.fpn, list(features)
    extra = _EXTRA.get(type(fpn.extra_blocks))
    if extra is None or len(names) != len(fpn.layer_blocks) + extra:  # the body gave one map per block
        return None
    pooled = [n for n in names if n in pool.featmap_names]  # RoIAlign's levels, in order
    if any(names.index(n) >= len(fpn.layer_blocks) for n in pooled):  # an extra level (a max-pool of P5...)
        return None
    layers = [f"backbone.fpn.layer_blocks.{names.index(n)}" for n in pooled]
    for name, shape in shapes.items():
        if name not in layers or tuple(shape) != tuple(features[pooled[layers.index(name)]].shape[-2:]):
            return None
    return [n if n in shapes else None for n in layers]


def rcnn_footprint(model: nn.Module, target: Target, outputs: dict,
                   shapes: Mapping[str, tuple[int, int]]) -> dict[str, Rect | None] | None:
    """``Adapter.footprint`` of a Faster, Mask or Keypoint R-CNN target: RoIAlign's footprint of its
    RoI at its level, at the layer that is that level; None where that is not a bound."""
    heads = model.roi_heads
    if target.detection is None or target.class_id is None:
        return None
    branch = "box" if target.class_id >= 0 else "mask" if heads.has_mask() else "keypoint"
    attr, (head, *head_types), (predictor, *predictor_types), key = _HEADS[branch]
    pool, box = getattr(heads, attr), target.detection.extra.get(key)
    if (box is None or type(pool) is not MultiScaleRoIAlign or pool.scales is None
            or type(getattr(heads, head)) not in head_types or type(getattr(heads, predictor)) not in predictor_types):
        return None
    features = outputs["features"]
    layers = _levels(model, features, pool, shapes)
    if layers is None:
        return None
    images = outputs["images"]
    # the level the pool picks, as it picks it (one level: no mapper)
    level = 0 if len(layers) == 1 else int(pool.map_levels([images.new_tensor([box])])[0])
    name = layers[level]
    rect = None if name is None else roi_align_rect(box, pool.scales[level], pool.output_size, pool.sampling_ratio,
                                                    shapes[name])
    return {n: rect if n == name else None for n in shapes}
