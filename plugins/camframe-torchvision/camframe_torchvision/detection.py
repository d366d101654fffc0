"""torchvision's detectors explained box by box: Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite.

The adapter's ``prepare`` returns a thin wrapper (``_Detector``) whose submodules are the model's
own (no parameter is copied); its forward runs the backbone (and a one-stage model's head) on a
batch that ``preprocess`` already resized and normalised with the model's own transform. What
depends on each image's size (anchors clipped, RPN proposals, NMS) runs in ``detect``, which
mirrors torchvision's ``postprocess_detections`` while keeping every kept detection's index:
the proposal (two-stage) or the anchor (one-stage) it came from. For support grouping, a one-stage
target is anchored at its location (``anchor``); a two-stage one is bounded by RoIAlign's footprint
of its RoI (``footprint``, ``roi_footprint``).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import detection as tvd
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import _resize_image_and_masks, resize_boxes
from torchvision.ops import boxes as box_ops

from camframe import Detection, DetectorAdapter, Target
from camframe.adapters import Rect, explaining

from .roi_footprint import rcnn_footprint

__all__ = ["TorchvisionDetector"]

MASK = "mask"  # the pseudo-class of a Mask R-CNN instance's mask logits


@dataclass
class _Kept:
    """One image's kept detections in input pixels, best first, with where each came from."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    index: Tensor  # the proposal (two-stage) or anchor (one-stage) each detection came from
    level: Tensor  # its pyramid level: RoIAlign's pick (two-stage), the head's level (one-stage)
    rois: Tensor | None = None  # two-stage: the proposals themselves
    probs: Tensor | None = None  # class probabilities, indexed by label (what drise compares)


def _nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float, max_det: int) -> Tensor:
    """torchvision's last step: class-wise NMS, the best ``max_det`` kept."""
    return box_ops.batched_nms(boxes, scores, labels, iou)[:max_det]


def _top(scores: Tensor, conf: float, topk: int) -> tuple[Tensor, Tensor]:
    """One-stage candidates of one group (level or class): scores above ``conf``, the best
    ``topk``, and their positions in ``scores``."""
    idx = torch.where(scores > conf)[0]
    best, order = scores[idx].topk(det_utils._topk_min(idx, topk, 0))
    return best, idx[order]


class _Detector(nn.Module):
    """The model's own parts: forward = backbone (+ one-stage head) on a preprocessed batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)

    def pyramid(self, x: Tensor) -> OrderedDict[str, Tensor]:
        features = self.backbone(x)
        return OrderedDict([("0", features)]) if isinstance(features, Tensor) else features

    def thresholds(self) -> dict[str, Any]:
        """The model's own ``conf``, ``iou`` and ``max_det``."""
        raise NotImplementedError

    def num_classes(self) -> int:
        raise NotImplementedError

    def parts(self) -> list[str]:
        """The pseudo-classes beyond the box classes."""
        return []

    def kept(self, outputs: dict, sizes: list[tuple[int, int]], conf: float, iou: float,
             max_det: int) -> list[_Kept]:
        """Per image, the detections the model's own postprocessing keeps."""
        raise NotImplementedError

    def scores(self, outputs: dict, targets: list[Target], parts: list[str]) -> Tensor:
        """Each target's logit, differentiable in the features."""
        raise NotImplementedError

    def anchor(self, target: Target, outputs: dict) -> tuple[Any, tuple[int, int], tuple[int, int]] | None:
        """The level, grid and cell a target's score is read at (``Adapter.anchor``); None: unbounded."""
        return None

    def at_cell(self, target: Target, cell: tuple[int, int], outputs: dict) -> Target:
        raise NotImplementedError

    def footprint(self, target: Target, outputs: dict, shapes: Mapping[str, tuple[int, int]]
                  ) -> dict[str, Rect | None] | None:
        """A target's window by arithmetic (``Adapter.footprint``); None: none (anchored, or unbounded)."""
        return None

    def geometry(self, outputs: dict, kept: list[_Kept], sizes: list[tuple[int, int]],
                 originals: list[tuple[int, int]]) -> list[list[dict[str, Any]]]:
        """Per kept detection, its ``mask`` outline or ``keypoints`` in original pixels (none here)."""
        return [[{} for _ in k.boxes] for k in kept]


def _outlines(mask: np.ndarray) -> list[list[list[float]]]:
    """A boolean mask's boundary as polygons of ``[x, y]`` pixel positions: outer contours and holes (filled
    together, even-odd, as ``cv2.fillPoly`` does with them all, they give the mask back)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).astype(float).tolist() for c in contours if len(c) >= 3]


class _RCNN(_Detector):
    """Faster, Mask and Keypoint R-CNN: RPN proposals (detached), RoIAlign, box head."""

    def forward(self, x: Tensor) -> dict[str, Any]:
        return {"images": x, "features": self.pyramid(x)}

    def thresholds(self) -> dict[str, Any]:
        heads = self.roi_heads
        return {"conf": heads.score_thresh, "iou": heads.nms_thresh, "max_det": heads.detections_per_img}

    def num_classes(self) -> int:
        return self.roi_heads.box_predictor.cls_score.out_features

    def parts(self) -> list[str]:
        """``mask``, or one pseudo-class per keypoint (named by the adapter)."""
        heads = self.roi_heads
        if heads.has_mask():
            return [MASK]
        return [f"kpt:{i}" for i in range(heads.keypoint_predictor.out_channels)] if heads.has_keypoint() else []

    def geometry(self, outputs: dict, kept: list[_Kept], sizes: list[tuple[int, int]],
                 originals: list[tuple[int, int]]) -> list[list[dict[str, Any]]]:
        """Mask R-CNN: each instance's mask as the model's eval output pastes it on the original image,
        above 0.5, as outline polygons; Keypoint R-CNN: its keypoints ``[x, y]``. Original pixels."""
        from torchvision.models.detection.roi_heads import (keypointrcnn_inference, maskrcnn_inference,
                                                             paste_masks_in_image)
        from torchvision.models.detection.transform import resize_keypoints

        heads, features = self.roi_heads, outputs["features"]
        boxes = [k.boxes for k in kept]
        if not any(len(b) for b in boxes) or not (heads.has_mask() or heads.has_keypoint()):
            return super().geometry(outputs, kept, sizes, originals)
        if heads.has_mask():
            logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, boxes, sizes)))
            probs = maskrcnn_inference(logits, [k.labels for k in kept])
            found = []
            for p, k, size, original in zip(probs, kept, sizes, originals):
                pasted = paste_masks_in_image(p, resize_boxes(k.boxes, size, original), original)[:, 0] > 0.5
                found.append([{"mask": _outlines(m.cpu().numpy())} for m in pasted])
            return found
        logits = heads.keypoint_predictor(heads.keypoint_head(heads.keypoint_roi_pool(features, boxes, sizes)))
        points, _ = keypointrcnn_inference(logits, boxes)
        return [[{"keypoints": [[round(x, 2), round(y, 2)] for x, y, _ in kp.tolist()]}
                 for kp in resize_keypoints(p, size, original)] for p, size, original in zip(points, sizes, originals)]

    def footprint(self, target: Target, outputs: dict, shapes: Mapping[str, tuple[int, int]]
                  ) -> dict[str, Rect | None] | None:
        """RoIAlign's footprint of the target's RoI (box classes: the kept proposal; ``mask``, ``kpt:``:
        the box) at its FPN level, where the captured layers are FPN levels it reads (``roi_footprint``)."""
        return rcnn_footprint(self, target, outputs, shapes)

    def roi_levels(self) -> list[int]:
        """The FPN levels (indices) RoIAlign can pick: one per scale from the first of its feature
        maps to the last (MobileNetV3's two FPN levels share one stride, so only the first)."""
        pool = self.roi_heads.box_roi_pool
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        with explaining(self), torch.no_grad():  # eval mode: BatchNorm statistics stay as they are
            features = self.pyramid(torch.zeros(1, 3, 128, 128, device=device))
        names = list(features)
        pooled = [n for n in pool.featmap_names if n in features]  # RoIAlign skips names the FPN lacks
        strides = [128 / features[n].shape[-1] for n in pooled]
        count = round(np.log2(strides[-1] / strides[0])) + 1
        return [names.index(n) for n in pooled[:count]]

    def _box_logits(self, features: dict, rois: list[Tensor], sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        heads = self.roi_heads
        return heads.box_predictor(heads.box_head(heads.box_roi_pool(features, rois, sizes)))

    def kept(self, outputs: dict, sizes: list[tuple[int, int]], conf: float, iou: float,
             max_det: int) -> list[_Kept]:
        features = outputs["features"]
        proposals, _ = self.rpn(ImageList(outputs["images"], sizes), features)
        class_logits, regression = self._box_logits(features, proposals, sizes)
        boxes = self.roi_heads.box_coder.decode(regression, proposals)
        scores = F.softmax(class_logits, -1)
        counts = [len(p) for p in proposals]
        levels = self.roi_heads.box_roi_pool.map_levels(proposals) if proposals else None
        kept, start = [], 0
        for b, (bxs, scs, size) in enumerate(zip(boxes.split(counts), scores.split(counts), sizes)):
            classes = scs.shape[-1] - 1  # background (0) dropped
            bxs = box_ops.clip_boxes_to_image(bxs, size)[:, 1:].reshape(-1, 4)
            scs = scs[:, 1:].reshape(-1)
            labels = torch.arange(1, classes + 1, device=scs.device).repeat(counts[b])
            idx = torch.where(scs > conf)[0]
            idx = idx[box_ops.remove_small_boxes(bxs[idx], min_size=1e-2)]
            idx = idx[_nms(bxs[idx], scs[idx], labels[idx], iou, max_det)]
            proposal = idx // classes
            level = levels[start + proposal].view(-1) if levels is not None else proposal
            kept.append(_Kept(bxs[idx], scs[idx], labels[idx], proposal, level, proposals[b][proposal],
                              scores.split(counts)[b][proposal]))  # softmax, background (label 0) included
            start += counts[b]
        return kept

    def scores(self, outputs: dict, targets: list[Target], parts: list[str]) -> Tensor:
        """Box class ``c``: the box head's logit of ``c`` for the kept proposal, recomputed through
        RoIAlign; ``mask``: the sum of the instance's positive mask logits; ``kpt:<k>``: the
        peak of keypoint ``k``'s heatmap logits."""
        features, x = outputs["features"], outputs["images"]
        sizes = [tuple(x.shape[-2:])] * len(x)
        for t in targets:
            sizes[t.image] = tuple(t.detection.extra["resized"])
        heads = self.roi_heads
        out: dict[int, Tensor] = {}
        for kind in ("box", "part"):
            # one RoI per target, image by image: row i of the pooled batch is group[i]
            group = sorted((t for t in targets if (t.class_id >= 0) == (kind == "box")), key=lambda t: t.image)
            if not group:
                continue
            key = "roi" if kind == "box" else "input_box"
            rois = [x.new_tensor([t.detection.extra[key] for t in group if t.image == b]).view(-1, 4)
                    for b in range(len(x))]
            if kind == "box":
                pool, head, predictor = heads.box_roi_pool, heads.box_head, lambda h: heads.box_predictor(h)[0]
            elif parts == [MASK]:
                pool, head, predictor = heads.mask_roi_pool, heads.mask_head, heads.mask_predictor
            else:
                pool, head, predictor = heads.keypoint_roi_pool, heads.keypoint_head, heads.keypoint_predictor
            # the head RoI by RoI: a score is computed alike whatever it is scored with (a batched matmul rounds
            # otherwise), so a support group's backward gives each target its one-backward gradient, bit for bit
            rows = [predictor(head(p[None]))[0] for p in pool(features, rois, sizes)]
            if kind == "box":
                values = torch.stack([r[t.class_id] for r, t in zip(rows, group)])
            elif parts == [MASK]:
                values = torch.stack([r[t.detection.class_id].relu().sum() for r, t in zip(rows, group)])
            else:
                values = torch.stack([r[-1 - t.class_id].max() for r, t in zip(rows, group)])
            out.update({id(t): v for t, v in zip(group, values)})
        return torch.stack([out[id(t)] for t in targets])


class _OneStage(_Detector):
    """RetinaNet, FCOS, SSD: one head over every pyramid level, anchors (locations) per level."""

    def forward(self, x: Tensor) -> dict[str, Any]:
        """Backbone, head and anchors; the class logits also per level (``levels``), so that a
        box's backward runs through its own level's branch of the head only."""
        features = list(self.pyramid(x).values())
        anchors = self.anchor_generator(ImageList(x, [tuple(x.shape[-2:])] * len(x)), features)
        return {"images": x, "features": features, "anchors": anchors, **self.run_head(features)}

    def run_head(self, features: list[Tensor]) -> dict[str, Any]:
        """RetinaNet's and FCOS's head, its classification branch run level by level (the same
        values as one call over all levels)."""
        levels = [self.head.classification_head([f]) for f in features]
        regression = self.head.regression_head(features)
        head = {"cls_logits": torch.cat(levels, 1).detach()}
        if isinstance(regression, tuple):  # FCOS
            head["bbox_regression"], head["bbox_ctrness"] = regression
        else:
            head["bbox_regression"] = regression
        return {"head": head, "levels": levels}

    def thresholds(self) -> dict[str, Any]:
        return {"conf": self._owner["score_thresh"], "iou": self._owner["nms_thresh"],
                "max_det": self._owner["detections_per_img"]}

    def own(self, model: nn.Module) -> "_OneStage":
        """Take the model's own postprocessing settings (attributes of the model itself)."""
        self._owner = {k: getattr(model, k) for k in ("score_thresh", "nms_thresh", "detections_per_img",
                                                       "topk_candidates")}
        self.box_coder = model.box_coder
        return self

    def num_classes(self) -> int:
        head = self.head.classification_head
        return int(getattr(head, "num_classes", getattr(head, "num_columns", 0)))

    def level_bounds(self, outputs: dict) -> Tensor:
        """The end of each level's anchors in the head's output."""
        per_cell = self.anchor_generator.num_anchors_per_location()
        return torch.tensor([f.shape[-2] * f.shape[-1] * a for f, a in zip(outputs["features"], per_cell)]).cumsum(0)

    def candidates(self, outputs: dict, b: int, conf: float) -> tuple[Tensor, Tensor, Tensor]:
        """Image ``b``'s per-level candidates: scores, anchors, labels."""
        head, topk = outputs["head"], self._owner["topk_candidates"]
        logits = head["cls_logits"][b]
        ctr = head.get("bbox_ctrness")
        classes, picked, start = logits.shape[-1], [], 0
        for end in self.level_bounds(outputs).tolist():
            scores = torch.sigmoid(logits[start:end])
            if ctr is not None:  # FCOS
                scores = torch.sqrt(scores * torch.sigmoid(ctr[b, start:end]))
            best, idx = _top(scores.flatten(), conf, topk)
            picked.append((best, idx // classes + start, idx % classes))
            start = end
        return tuple(torch.cat(p) for p in zip(*picked))  # type: ignore[return-value]

    def decode(self, outputs: dict, b: int, anchors: Tensor) -> Tensor:
        regression, prior = outputs["head"]["bbox_regression"][b][anchors], outputs["anchors"][b][anchors]
        return self.box_coder.decode(regression, prior) if "bbox_ctrness" in outputs["head"] \
            else self.box_coder.decode_single(regression, prior)

    def kept(self, outputs: dict, sizes: list[tuple[int, int]], conf: float, iou: float,
             max_det: int) -> list[_Kept]:
        bounds = self.level_bounds(outputs)
        kept = []
        for b, size in enumerate(sizes):
            scores, anchors, labels = self.candidates(outputs, b, conf)
            boxes = box_ops.clip_boxes_to_image(self.decode(outputs, b, anchors), size)
            keep = _nms(boxes, scores, labels, iou, max_det)
            level = torch.searchsorted(bounds.to(anchors.device), anchors[keep], right=True)
            kept.append(_Kept(boxes[keep], scores[keep], labels[keep], anchors[keep], level,
                              probs=self.class_probs(outputs, b, anchors[keep])))
        return kept

    def class_probs(self, outputs: dict, b: int, anchors: Tensor) -> Tensor:
        """Image ``b``'s per-class scores at ``anchors`` (sigmoid; FCOS: with centerness, as its
        candidates), with a last background entry ``1 - max``: the head has no background output."""
        head = outputs["head"]
        probs = torch.sigmoid(head["cls_logits"][b][anchors])
        if "bbox_ctrness" in head:
            probs = torch.sqrt(probs * torch.sigmoid(head["bbox_ctrness"][b, anchors]))
        return torch.cat([probs, 1 - probs.amax(1, keepdim=True)], 1)

    def _cell(self, target: Target, outputs: dict) -> tuple[int, int, int, int]:
        """Level, first anchor index of that level, anchors per location and grid width of a target."""
        assert target.detection is not None and target.detection.index is not None
        level = int(target.detection.extra["level"])
        start = ([0, *self.level_bounds(outputs).tolist()])[level]
        per_cell = self.anchor_generator.num_anchors_per_location()[level]
        return level, start, per_cell, outputs["features"][level].shape[-1]

    def anchor(self, target: Target, outputs: dict) -> tuple[Any, tuple[int, int], tuple[int, int]] | None:
        """A class logit's level, the level's grid and the location (``scores`` reads it there)."""
        if target.detection is None or target.detection.index is None or target.class_id is None:
            return None
        level, start, per_cell, width = self._cell(target, outputs)
        y, x = divmod((target.detection.index - start) // per_cell, width)
        return level, tuple(outputs["features"][level].shape[-2:]), (y, x)

    def at_cell(self, target: Target, cell: tuple[int, int], outputs: dict) -> Target:
        assert target.detection is not None and target.detection.index is not None
        level, start, per_cell, width = self._cell(target, outputs)
        index = start + (cell[0] * width + cell[1]) * per_cell + (target.detection.index - start) % per_cell
        return replace(target, image=0, detection=replace(target.detection, index=index))

    def scores(self, outputs: dict, targets: list[Target], parts: list[str]) -> Tensor:
        """The class logit at the anchor (location) that produced the box, from its level's logits."""
        starts = [0, *self.level_bounds(outputs).tolist()]
        values = []
        for t in targets:
            level = t.detection.extra["level"]
            values.append(outputs["levels"][level][t.image, t.detection.index - starts[level], t.class_id])
        return torch.stack(values)


class _SSD(_OneStage):
    """SSD and SSDlite: softmax scores; candidates picked per class rather than per level."""

    def run_head(self, features: list[Tensor]) -> dict[str, Any]:
        """The head over all levels (one convolution per level: a backward through all is cheap)."""
        head = self.head(features)
        return {"head": head, "levels": [head["cls_logits"]]}

    def scores(self, outputs: dict, targets: list[Target], parts: list[str]) -> Tensor:
        logits = outputs["head"]["cls_logits"]
        return torch.stack([logits[t.image, t.detection.index, t.class_id] for t in targets])

    def candidates(self, outputs: dict, b: int, conf: float) -> tuple[Tensor, Tensor, Tensor]:
        scores = F.softmax(outputs["head"]["cls_logits"], dim=-1)[b]
        picked = []
        for label in range(1, scores.shape[-1]):
            best, anchors = _top(scores[:, label], conf, self._owner["topk_candidates"])
            picked.append((best, anchors, torch.full_like(anchors, label)))
        return tuple(torch.cat(p) for p in zip(*picked))  # type: ignore[return-value]

    def class_probs(self, outputs: dict, b: int, anchors: Tensor) -> Tensor:
        """The softmax over classes at ``anchors``, background (label 0) included."""
        return F.softmax(outputs["head"]["cls_logits"][b][anchors], dim=-1)

    def decode(self, outputs: dict, b: int, anchors: Tensor) -> Tensor:
        """All boxes decoded, then picked (as SSD does; the same values)."""
        return self.box_coder.decode_single(outputs["head"]["bbox_regression"][b], outputs["anchors"][b])[anchors]


def _wrap(model: nn.Module) -> _Detector:
    if isinstance(model, tvd.generalized_rcnn.GeneralizedRCNN):
        return _RCNN(model)
    if isinstance(model, tvd.ssd.SSD):
        return _SSD(model).own(model)
    return _OneStage(model).own(model)


def _meta_names(weights: str, key: str, count: int) -> list[str] | None:
    """Names from a torchvision weights enum's meta when the model has as many outputs."""
    names = list(getattr(tvd, weights).COCO_V1.meta[key])
    return names if len(names) == count else None


class TorchvisionDetector(DetectorAdapter):
    """torchvision detectors: Faster R-CNN (ResNet-50 FPN v1/v2, MobileNetV3 FPN), Mask R-CNN,
    Keypoint R-CNN, RetinaNet, FCOS, SSD and SSDlite.

    Detections are the model's own eval output (its transform, thresholds, NMS); options ``conf``,
    ``iou`` and ``max_det`` default to the model's ``score_thresh``, ``nms_thresh`` and
    ``detections_per_img``. Class names: the model's ``categories`` attribute (background first,
    one per class) where it has one, else COCO's (Keypoint R-CNN's: ``no person``, ``person``). The
    target of box *k* and class *c* is the class logit the model computed for that detection: the
    box head's for the kept proposal (two-stage) or the head's at the anchor that survived NMS
    (one-stage). Pseudo-classes: ``mask`` (Mask R-CNN) and
    ``kpt:<name>`` (Keypoint R-CNN). Default layers: the pyramid levels the head reads.
    """

    name = "torchvision-detection"
    priority = -10
    guided = False
    target_score_kind = "logit"  # the detection's class logit; pseudo-classes: ``score_kind``
    allow_unreached = True  # a box reaches only its own pyramid level
    defaults: dict[str, Any] = {"conf": None, "iou": None, "max_det": None}
    option_types = {"conf": float, "iou": float, "max_det": int}
    option_minimums = {"max_det": 1}
    cli_options = {**DetectorAdapter.cli_options, "iou": "NMS IoU threshold"}

    def __init__(self) -> None:
        self.options = dict(self.defaults)
        self.names: list[str] = []
        self.parts: list[str] = []

    def matches(self, model: Any) -> bool:
        return isinstance(model, (tvd.generalized_rcnn.GeneralizedRCNN, tvd.RetinaNet, tvd.FCOS, tvd.ssd.SSD))

    def prepare(self, model: nn.Module) -> nn.Module:
        wrapper = _wrap(model)
        self.options = {**wrapper.thresholds(), **{k: v for k, v in self.options.items() if v is not None}}
        count = wrapper.num_classes()
        own = list(getattr(model, "categories", None) or [])  # a custom model's names, background first
        self.parts = wrapper.parts()
        keypoints = bool(self.parts) and self.parts != [MASK]
        coco = "KeypointRCNN_ResNet50_FPN_Weights" if keypoints else "FasterRCNN_ResNet50_FPN_Weights"
        self.names = own if len(own) == count else \
            _meta_names(coco, "categories", count) or [str(i) for i in range(count)]
        self._model = wrapper
        if keypoints:
            self.parts = [f"kpt:{n}" for n in _meta_names("KeypointRCNN_ResNet50_FPN_Weights", "keypoint_names",
                                                          len(self.parts)) or range(len(self.parts))]
        return wrapper

    def layers(self, model: nn.Module) -> list[str]:
        """The pyramid levels the head reads: FPN outputs (with P6/P7 where they are modules; for a
        two-stage model those RoIAlign can pick), or SSD's feature maps."""
        backbone = model.backbone
        if isinstance(model, _RCNN):
            return [f"backbone.fpn.layer_blocks.{i}" for i in model.roi_levels()]
        if hasattr(backbone, "fpn"):
            fpn = backbone.fpn
            extra = [f"backbone.fpn.extra_blocks.{p}" for p in ("p6", "p7") if hasattr(fpn.extra_blocks, p)]
            return [f"backbone.fpn.layer_blocks.{i}" for i in range(len(fpn.layer_blocks))] + extra
        first = ["backbone.features"] if isinstance(backbone, tvd.ssd.SSDFeatureExtractorVGG) else \
            [f"backbone.features.{i}" for i in range(len(backbone.features))]
        return first + [f"backbone.extra.{i}" for i in range(len(backbone.extra))]

    def class_names(self, model: nn.Module) -> list[str]:
        return self.names

    def resolve_classes(self, classes: Sequence[int | str], model: nn.Module) -> list[int]:
        """Class ids, and the pseudo-classes' ids -1, -2... (``mask``, ``kpt:<name>``)."""
        parts = {name: -1 - i for i, name in enumerate(self.parts)}
        parts.update({f"kpt:{i}": -1 - i for i in range(len(self.parts)) if self.parts != [MASK]})
        ids = []
        for c in classes:
            part = isinstance(c, int) and -len(self.parts) <= c < 0
            ids += [c] if part else [parts[c]] if c in parts else super().resolve_classes([c], model)
        return ids

    def target_name(self, class_id: int, model: nn.Module) -> str:
        return self.parts[-1 - class_id] if class_id < 0 else self.names[class_id]

    def score_kind(self, target: Target) -> str:
        """A class's logit; ``mask``: the sum of positive mask logits; ``kpt:``: a heatmap's peak logit."""
        if target.class_id is None or target.class_id >= 0:
            return self.target_score_kind
        return "mask-logit-sum" if self.parts == [MASK] else "keypoint-heatmap-logit"

    def example_input(self, model: nn.Module) -> Tensor:
        transform = model.transform
        size = transform.fixed_size or (transform.min_size[-1],) * 2
        return torch.zeros(1, 3, *size)

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module) -> tuple[Tensor, list[dict]]:
        """The model's own transform in eval mode: normalise, resize, pad into one batch."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return self._transformed(images, model.transform, device)

    def preprocessor(self, model: nn.Module) -> Callable[[Sequence[np.ndarray]], tuple[Tensor, list[dict]]]:
        """The same transform on the CPU (for worker processes): only the transform is bound."""
        return functools.partial(self._transformed, transform=model.transform, device=torch.device("cpu"))

    def _transformed(self, images: Sequence[np.ndarray], transform: nn.Module, device: torch.device
                     ) -> tuple[Tensor, list[dict]]:
        resized = []
        for im in images:
            x = torch.tensor(im, device=device).permute(2, 0, 1).float().div_(255)  # a copy: im may be read-only
            x, _ = _resize_image_and_masks(transform.normalize(x), transform.min_size[-1], transform.max_size,
                                           None, transform.fixed_size)
            resized.append(x)
        batch = transform.batch_images(resized, size_divisible=transform.size_divisible)
        metas = []
        for im, x in zip(images, resized):
            meta = self.meta(im.shape[:2], batch.shape[-2:], content=x.shape[-2:])
            metas.append({**meta, "resized": tuple(x.shape[-2:])})
        return batch, metas

    def detect(self, outputs: Any, metas: list[dict], model: nn.Module,
               conf: float | None = None) -> list[list[Detection]]:
        o = self.options
        x = outputs["images"]
        sizes = [tuple(m.get("resized", x.shape[-2:])) for m in metas]
        with torch.no_grad():
            kept = model.kept(outputs, sizes, o["conf"] if conf is None else conf, o["iou"], o["max_det"])
            originals = [tuple(m["size"]) for m in metas]
            shapes = model.geometry(outputs, kept, sizes, originals) if conf is None else [[{}] * len(k.boxes)
                                                                                            for k in kept]
        return [[Detection(d.box, d.class_id, d.class_name, d.score, d.index, {**d.extra, **g}, d.probs)
                 for d, g in zip(self._detections(k, meta, size), shape)]
                for k, meta, size, shape in zip(kept, metas, sizes, shapes)]

    def candidate(self, outputs: Any, metas: list[dict], model: nn.Module, image: int,
                  box: Sequence[float], class_id: int | None) -> Detection | None:
        """RetinaNet, FCOS, SSD: the anchor (location); Faster/Mask/Keypoint R-CNN: the proposal; picked by
        ``pick_candidate`` among the model's own candidates before ``conf`` and NMS (one-stage: each level's
        ``topk_candidates`` best, as the model takes them), by their boxes for that class."""
        x = outputs["images"]
        sizes = [tuple(m.get("resized", x.shape[-2:])) for m in metas]
        with torch.no_grad():  # every candidate: no threshold, no suppression (IoU never exceeds 1)
            every = model.kept(outputs, sizes, 0.0, 1.0, 10 ** 9)[image]
        rows = torch.arange(len(every.labels), device=every.labels.device)
        if class_id is not None:
            rows = rows[every.labels == class_id]
        picked = self.pick_candidate(every.boxes[rows], every.scores[rows, None], self.box_to_input(box, metas[image]),
                                     None)
        if picked is None:
            return None
        r = rows[picked[0]:picked[0] + 1]
        one = _Kept(every.boxes[r], every.scores[r], every.labels[r], every.index[r], every.level[r],
                    None if every.rois is None else every.rois[r], None if every.probs is None else every.probs[r])
        return self._detections(one, metas[image], sizes[image])[0]

    def _detections(self, kept: _Kept, meta: dict, size: tuple[int, int]) -> list[Detection]:
        """Boxes back on the original image as the model's ``transform.postprocess`` puts them."""
        boxes = resize_boxes(kept.boxes, size, meta["size"]) if "size" in meta else kept.boxes
        dets = []
        for k, (box, score, label) in enumerate(zip(boxes.tolist(), kept.scores.tolist(), kept.labels.tolist())):
            extra = {"level": int(kept.level[k]), "resized": list(size), "input_box": kept.boxes[k].tolist()}
            if kept.rois is not None:
                extra["roi"] = kept.rois[k].tolist()
            probs = None if kept.probs is None else kept.probs[k].detach().float().cpu()
            dets.append(Detection(tuple(box), int(label), self.names[label], float(score), int(kept.index[k]), extra,
                                  probs))
        return dets

    def score(self, outputs: Any, targets: list[Target]) -> Tensor:
        return self._model.scores(outputs, targets, self.parts)

    def anchor(self, target: Target, outputs: Any) -> tuple[Any, tuple[int, int], tuple[int, int]] | None:
        return self._model.anchor(target, outputs)

    def at_cell(self, target: Target, cell: tuple[int, int], outputs: Any) -> Target:
        return self._model.at_cell(target, cell, outputs)

    def footprint(self, target: Target, outputs: Any, shapes: Mapping[str, tuple[int, int]]
                  ) -> dict[str, Rect | None] | None:
        return self._model.footprint(target, outputs, shapes)
