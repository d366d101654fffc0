"""The YOLO adapter: letterbox, NMS with anchor indices, per-box per-class logit targets."""

from __future__ import annotations

import copy
import functools
import math
import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from camframe import CamframeError, Detection, DetectorAdapter, Target

# Box-regression targets: the distance from a box's anchor to each side (DFL expectation, grid units).
SIDES = ("box.left", "box.top", "box.right", "box.bottom")
MASK = -len(SIDES) - 1  # Segment heads: the mean mask logit over the instance's mask
KPT0 = MASK - 1  # Pose heads: keypoint k's visibility logit is pseudo-class KPT0 - k
COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle")
# the limbs Ultralytics' plot() draws between COCO's 17 keypoints (Annotator.skeleton, 0-based here)
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
                 (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
PREFIX = 4  # NMS runs on the 4 × max_det best-scoring anchors first, then 16 ×, ... (YOLOAdapter._nms)
_DEFAULTS: dict[str, Any] = {"conf": 0.25, "iou": 0.7, "imgsz": None, "max_det": 300, "agnostic": False, "nms": None}


def _parts() -> tuple[type, type, type, type]:
    from ultralytics.engine.model import Model
    from ultralytics.nn.modules.head import OBB, Detect
    from ultralytics.nn.tasks import DetectionModel

    return Model, DetectionModel, Detect, OBB


def keypoint_names(model: nn.Module) -> list[str]:
    """A Pose model's keypoint names: its own ``kpt_names``, else COCO's for 17 keypoints, else indices."""
    head = model.model[-1]
    count = int(head.kpt_shape[0])
    names = getattr(model, "kpt_names", None)
    if isinstance(names, dict) and names:
        names = next(iter(names.values()))
    if names and len(names) == count:
        return [str(n) for n in names]
    return list(COCO_KEYPOINTS) if count == len(COCO_KEYPOINTS) else [str(k) for k in range(count)]


class YOLOAdapter(DetectorAdapter):
    """Ultralytics Detect-head models (YOLOv5u, v8, v10, 11, 26; their seg, pose and OBB variants).

    Segment heads add target ``mask`` (the mean mask logit over the instance's mask), Pose heads
    ``kpt:NAME`` or ``kpt:INDEX`` (the keypoint's visibility logit, keypoints in ``extra``), OBB
    heads rotated NMS (the rotated box in ``extra["xywhr"]`` and ``extra["polygon"]``).

    Works on a private float32 copy in eval mode: the user's model is never fused, trained or
    put under ``inference_mode``. The target of box *k* and class *c* is the class logit at the
    anchor that produced box *k*. End-to-end heads (YOLOv10, YOLO26) follow the branch the model
    is set to use, as ``predict()`` does: by default the one-to-many branch with NMS; option
    ``nms=False`` selects the one-to-one branch, whose top-k replaces NMS. In eval mode neither
    branch is detached, so gradients reach the neck either way.
    """

    name = "ultralytics"
    priority = -10
    target_score_kind = "logit"  # a class's logit (its sigmoid: the confidence); pseudo-classes: ``score_kind``
    aggregate = "max"  # the neck's multi-scale maps on a common scale: chosen by docs/evaluation.md (both
    normalise = "common"  # fills' deletion/insertion on the shapes and the real photos, sanity check)
    fill_value = 114 / 255  # the letterbox's grey: what drise puts where a mask hides the image
    guided = False
    allow_unreached = True

    defaults = _DEFAULTS
    option_types = {"imgsz": int, "nms": bool}  # their defaults are None (the model's own)
    option_minimums = {"max_det": 1, "imgsz": 1}
    cli_options = {**DetectorAdapter.cli_options, "iou": "NMS IoU threshold", "imgsz": "model input size"}

    def __init__(self) -> None:
        self.options = dict(_DEFAULTS)
        self.names: list[str] = []
        self.imgsz = 640
        self.end2end = False
        self.keypoints: list[str] = []
        self.masks = False
        self.rotated = False

    def matches(self, model: Any) -> bool:
        try:
            Model, DetectionModel, Detect, _ = _parts()
        except ImportError:
            return False
        inner = model.model if isinstance(model, Model) else model
        return isinstance(inner, DetectionModel) and isinstance(inner.model[-1], Detect)

    def prepare(self, model: Any) -> nn.Module:
        Model = _parts()[0]
        inner = model.model if isinstance(model, Model) else model
        private = copy.deepcopy(inner).float()
        head = private.model[-1]
        head.shape = None  # anchors cached by predict() are inference tensors: rebuild them
        head.export = False
        self._dfl = head.dfl
        if self.options["nms"] is not None and hasattr(head, "one2one_cv2"):
            head.end2end = not self.options["nms"]
        self.end2end = bool(getattr(head, "end2end", False))
        self._heads = getattr(head, "one2one" if self.end2end else "one2many", None) or \
            {"box_head": head.cv2, "cls_head": head.cv3}
        self.masks = hasattr(head, "proto")
        self.rotated = isinstance(head, _parts()[3])
        self.keypoints = keypoint_names(private) if hasattr(head, "kpt_shape") else []
        self.skeleton = COCO_SKELETON if len(self.keypoints) == len(COCO_KEYPOINTS) else ()
        names = getattr(private, "names", None) or {i: str(i) for i in range(head.nc)}
        self.names = [names[i] for i in range(len(names))] if isinstance(names, dict) else list(names)
        args = getattr(private, "args", None)
        train_size = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
        size = self.options["imgsz"] or train_size or 640
        self.imgsz = int(size if isinstance(size, int) else max(size))
        stride = int(max(head.stride)) if hasattr(head, "stride") else 32
        if self.imgsz % stride:
            raise CamframeError(f"imgsz {self.imgsz} is not a multiple of the model's stride {stride}")
        return private

    def layers(self, model: nn.Module) -> list[str]:
        """The neck: every module between backbone and head but Concat/Upsample (the head's
        inputs alone see a box only through the head's few convolutions)."""
        return self.layer_presets(model)["neck"]

    def layer_presets(self, model: nn.Module) -> dict[str, list[str]]:
        from ultralytics.nn.modules import Concat

        head_inputs = [f"model.{i}" for i in model.model[-1].f]
        n_backbone = len(model.yaml["backbone"]) if isinstance(getattr(model, "yaml", None), dict) else 0
        neck = [f"model.{i}" for i in range(n_backbone, len(model.model) - 1)
                if not isinstance(model.model[i], (Concat, nn.Upsample))] if n_backbone else head_inputs
        backbone = sorted({i for i in model.save if i < n_backbone} | {n_backbone - 1}) if n_backbone else []
        return {"head-inputs": head_inputs, "neck": neck, "backbone": [f"model.{i}" for i in backbone]}

    def class_names(self, model: nn.Module) -> list[str]:
        return self.names

    def resolve_classes(self, classes: Sequence[int | str], model: nn.Module) -> list[int]:
        """Class ids, and pseudo-classes given by name or id: the box sides -1..-4 (``box.left``...),
        ``mask`` (-5, Segment heads) and ``kpt:NAME`` or ``kpt:INDEX`` (-6 - index, Pose heads)."""
        pseudo = {self.target_name(i, model): i for i in range(-1, KPT0 - len(self.keypoints), -1)
                  if i != MASK or self.masks}
        pseudo.update({f"kpt:{k}": KPT0 - k for k in range(len(self.keypoints))})
        ids = []
        for c in classes:
            if isinstance(c, str) and c not in self.names:  # the model's own class names come first
                if c not in pseudo and (c == "mask" or c.startswith("kpt:")):
                    raise CamframeError(f"unknown target {c!r}; this model's pseudo-classes are: {', '.join(pseudo)}")
                c = pseudo.get(c, c)
            ids += [c] if isinstance(c, int) and c in pseudo.values() else super().resolve_classes([c], model)
        if any(i <= KPT0 for i in ids) and model.model[-1].kpt_shape[1] != 3:
            raise CamframeError("keypoint targets need keypoint visibilities (kpt_shape (K, 3))")
        return ids

    def target_name(self, class_id: int, model: nn.Module) -> str:
        if class_id >= 0:
            return self.names[class_id]
        if class_id == MASK:
            return "mask"
        return SIDES[-1 - class_id] if class_id > MASK else f"kpt:{self.keypoints[KPT0 - class_id]}"

    def example_input(self, model: nn.Module) -> Tensor:
        return torch.zeros(1, 3, self.imgsz, self.imgsz)

    def score_kind(self, target: Target) -> str:
        """A class's or keypoint's (visibility) logit; ``mask``: the mean mask logit; a box side: grid units."""
        c = target.class_id
        return "logit" if c is None or c >= 0 or c < MASK else "mask-logit-mean" if c == MASK else "box-side-grid"

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module) -> tuple[Tensor, list[dict]]:
        return self._letterboxed(images, int(max(model.model[-1].stride)))

    def preprocessor(self, model: nn.Module) -> Callable[[Sequence[np.ndarray]], tuple[Tensor, list[dict]]]:
        """``preprocess`` with the head's stride read here (a GPU buffer must not be read in a worker)."""
        return functools.partial(self._letterboxed, stride=int(max(model.model[-1].stride)))

    def _letterboxed(self, images: Sequence[np.ndarray], stride: int) -> tuple[Tensor, list[dict]]:
        from ultralytics.data.augment import LetterBox

        letterbox = LetterBox((self.imgsz, self.imgsz), auto=False, stride=stride)
        batch = np.stack([letterbox(image=im) for im in images])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255)
        return x, [self._letterbox_meta(im.shape[:2]) for im in images]

    def _letterbox_meta(self, size: tuple[int, ...]) -> dict[str, Any]:
        """Where ``LetterBox`` puts an image of ``size``: resized by the same gain on both sides
        (each side rounded), centred."""
        gain = min(self.imgsz / size[0], self.imgsz / size[1])
        content = [max(round(s * gain), 1) for s in size[:2]]
        offset = [round((self.imgsz - c) / 2 - 0.1) for c in content]
        return self.meta(size, (self.imgsz, self.imgsz), offset, content)

    def _branch(self, outputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        if not (isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], dict)):
            raise CamframeError("unexpected YOLO output; is the head in export mode?")
        y, raw = outputs
        y = y[0] if isinstance(y, (tuple, list)) else y
        if "one2many" in raw:
            raw = raw["one2one" if self.end2end else "one2many"]
        return y, raw

    def detect(self, outputs: Any, metas: list[dict], model: nn.Module,
               conf: float | None = None) -> list[list[Detection]]:
        kept, keep, raw = self._kept(outputs, model, self.options["conf"] if conf is None else conf)
        bounds = torch.tensor([f.shape[-2] * f.shape[-1] for f in raw["feats"]]).cumsum(0)
        strides = [float(s) for s in model.model[-1].stride]
        detections = []
        for b, (meta, pred, idx) in enumerate(zip(metas, kept, keep)):
            dets = []
            for row, anchor, probs in zip(pred.tolist(), idx.tolist(), self._probs(outputs, b, idx)):
                level, cls = int(torch.searchsorted(bounds, anchor, right=True)), int(row[5])
                box, extra = self._rotated(row, meta) if self.rotated else (self.box_to_original(row[:4], meta), {})
                dets.append(Detection(box, cls, self.names[cls], float(row[4]), int(anchor),
                                      {"stride": strides[level], "level": level, **extra, **self._extra(row, meta)},
                                      probs))
            if self.masks and dets and conf is None:  # the detections reported, not rescoring's
                self._outline(dets, pred, outputs[0][1][b], meta)
            detections.append(dets)
        return detections

    def _outline(self, dets: list[Detection], pred: Tensor, proto: Tensor, meta: dict) -> None:
        """Each Segment detection's ``extra["mask"]``: its mask's outline polygons in original pixels, made
        as Ultralytics' ``Results.masks.xy`` (the mask logits upsampled to the input, cropped to the box,
        positive), holes included: filled together (even-odd) they give the mask."""
        import cv2
        import torch.nn.functional as F

        coefficients = pred[:, 6:6 + proto.shape[0]].to(proto.dtype)
        logits = F.interpolate(torch.einsum("nc,chw->nhw", coefficients, proto.detach())[None], meta["input"],
                               mode="bilinear", align_corners=False)[0]
        (top, left), (sy, sx) = meta["offset"], meta["scale"]
        for det, logit, box in zip(dets, logits, pred[:, :4].tolist()):
            x1, y1, x2, y2 = (max(int(round(v)), 0) for v in box)
            inside = np.zeros(logit.shape, np.uint8)
            inside[y1:y2, x1:x2] = (logit[y1:y2, x1:x2] > 0).cpu().numpy()
            contours, _ = cv2.findContours(inside, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            det.extra["mask"] = [[[round((x - left) / sx, 1), round((y - top) / sy, 1)] for x, y in c.reshape(-1, 2)]
                                 for c in contours if len(c) >= 3]

    def _probs(self, outputs: Any, b: int, anchors: Tensor) -> Tensor:
        """Image ``b``'s class probabilities (sigmoid scores) at ``anchors``, one row each, with a last
        background entry ``1 - max`` (the head has no background class): what ``drise`` compares."""
        y, raw = self._branch(outputs)
        nc = len(self.names)
        if not anchors.numel():  # no detection: NMS gives an empty float (0, 1) index
            return torch.zeros(0, nc + 1)
        probs = raw["scores"][b][:, anchors].sigmoid() if self.end2end else y[b, 4:4 + nc, anchors]
        probs = probs.detach().T.float().cpu()
        return torch.cat([probs, 1 - probs.amax(1, keepdim=True)], 1)

    def _rotated(self, row: list[float], meta: dict) -> tuple[tuple[float, ...], dict[str, Any]]:
        """An OBB row ``[x, y, w, h, conf, class, angle]``: the clipped box enclosing it, and its
        rotated box ``xywhr`` and corner ``polygon`` in original pixels."""
        from ultralytics.utils.ops import xywhr2xyxyxyxy

        (top, left), (sy, sx) = meta["offset"], meta["scale"]
        corners = xywhr2xyxyxyxy(torch.tensor(row[:4] + row[6:7]))
        lo, hi = corners.amin(0).tolist(), corners.amax(0).tolist()
        x, y, w, h = row[:4]
        xywhr = [(x - left) / sx, (y - top) / sy, w / sx, h / sy, row[6]]
        polygon = [[round((px - left) / sx, 2), round((py - top) / sy, 2)] for px, py in corners.tolist()]
        return self.box_to_original(lo + hi, meta), {"xywhr": [round(v, 4) for v in xywhr], "polygon": polygon}

    def _extra(self, row: list[float], meta: dict) -> dict[str, Any]:
        """A Segment head's box in input pixels (its mask's crop); a Pose head's keypoints
        ``[x, y, visibility]`` in original pixels."""
        if self.masks:
            return {"input_box": [round(v, 2) for v in row[:4]]}
        if not self.keypoints:
            return {}
        ndim = len(row[6:]) // len(self.keypoints)
        points = [row[6 + k * ndim:6 + (k + 1) * ndim] for k in range(len(self.keypoints))]
        return {"keypoints": [[round(v, 2) for v in self.box_to_original(p[:2] * 2, meta)[:2]] + p[2:]
                              for p in points]}  # clipped to the image, as Ultralytics does

    def _kept(self, outputs: Any, model: nn.Module, conf: float) -> tuple[list[Tensor], list[Tensor], dict]:
        """Per image, the kept rows ``[x1, y1, x2, y2, conf, class, extra...]`` (input pixels, best first;
        OBB: ``[x, y, w, h, conf, class, angle]``) and their anchor indices: by NMS, or an end-to-end
        head's top-k; and the raw head output."""
        y, raw = self._branch(outputs)
        o = self.options
        if not self.end2end:
            rows = [self._nms(pred[None], conf) for pred in y.detach()]
            return [r for r, _ in rows], [k for _, k in rows], raw
        head = model.model[-1]
        _, _, anchors = head.get_topk_index(raw["scores"].detach().sigmoid().permute(0, 2, 1), head.max_det)
        rows = [(pred[:, 4] > conf).nonzero().view(-1)[:o["max_det"]] for pred in y.detach()]
        return [y[b, r].detach().float() for b, r in enumerate(rows)], [anchors[b, r] for b, r in enumerate(rows)], raw

    def _nms(self, pred: Tensor, conf: float) -> tuple[Tensor, Tensor]:
        """Ultralytics' NMS of one image ``(1, 4 + nc + extra, anchors)``: kept rows and anchor indices.
        Whether a box is kept depends only on the boxes scoring above it, so NMS first runs on the
        ``PREFIX`` × ``max_det`` best-scoring anchors alone (a low ``conf`` leaves thousands, and NMS is
        quadratic in them), then on ``PREFIX`` times as many, until it keeps ``max_det`` boxes or has
        seen every candidate: the same boxes as one NMS over all, equal scores included."""
        from ultralytics.utils.nms import non_max_suppression

        o, nc = self.options, len(self.names)

        def run(p: Tensor) -> tuple[Tensor, Tensor]:
            kept, keep = non_max_suppression(p.clone(), conf, o["iou"], None, o["agnostic"], max_det=o["max_det"],
                                             nc=nc, return_idxs=True, rotated=self.rotated,
                                             max_time_img=math.inf)  # no time limit: a busy CPU must not drop boxes
            return kept[0], keep[0]

        prefix = PREFIX * o["max_det"]
        if pred.shape[-1] > prefix:
            scores, order = pred[0, 4:4 + nc].amax(0).sort(descending=True, stable=True)
            # torchvision's NMS (Ultralytics' choice where it is loaded) keeps equal scores in the anchors' order,
            # as the stable sort above does; the rotated boxes' NMS sorts them its own way: only all anchors
            # reproduce that order
            stable = not self.rotated and "torchvision" in sys.modules
            while prefix < len(order):
                if not stable and bool((scores[1:prefix + 1] == scores[:prefix]).any()):
                    break
                best = order[:prefix].sort().values  # the anchors in their own order, as NMS would see them
                kept, keep = run(pred[..., best])
                if len(kept) == o["max_det"] or scores[prefix] <= conf:  # enough boxes, or every candidate ran
                    return kept, best[keep.long()]
                prefix *= PREFIX
        return run(pred)

    def score(self, outputs: Any, targets: list[Target]) -> Tensor:
        """Each target's class logit (or box side) read from its own pyramid level's head output,
        recomputed from that level's features, so a backward runs through that level's branch
        only, not through the concatenation of all levels."""
        _, raw = self._branch(outputs)
        cache = raw.setdefault("camframe_levels", {})
        feats = raw["feats"]
        scores = []
        for t in targets:
            assert t.detection is not None and t.detection.index is not None
            level = t.detection.extra["level"]
            height, width = feats[level].shape[-2:]
            offset = sum(f.shape[-2] * f.shape[-1] for f in feats[:level])
            y, x = divmod(t.detection.index - offset, width)
            kind = _head_kind(t.class_id)
            if (kind, level) not in cache:
                cache[kind, level] = self._heads[kind][level](feats[level])
            out = cache[kind, level][t.image, :, y, x]
            if t.class_id >= 0:
                scores.append(out[t.class_id])
            elif t.class_id == MASK:
                scores.append(self._mask_score(out, outputs[0][1][t.image], t.detection.extra["input_box"]))
            elif t.class_id < MASK:
                scores.append(out[(KPT0 - t.class_id) * 3 + 2])
            else:
                scores.append(self._dfl(out.reshape(1, -1, 1))[0, -1 - t.class_id, 0])
        return torch.stack(scores)

    def _mask_score(self, coefficients: Tensor, proto: Tensor, box: list[float]) -> Tensor:
        """The mean mask logit over the instance's mask: where the logit is positive inside its box,
        at the prototypes' resolution, as Ultralytics crops masks (the whole box if that is empty)."""
        logits = torch.einsum("c,chw->hw", coefficients, proto)
        h, w = logits.shape
        ratio = w / self.imgsz
        ys, xs = torch.arange(h, device=logits.device)[:, None], torch.arange(w, device=logits.device)
        inside = (xs >= box[0] * ratio) & (xs < box[2] * ratio) & (ys >= box[1] * ratio) & (ys < box[3] * ratio)
        region = inside & (logits.detach() > 0)
        region = region if region.any() else inside
        return logits[region].mean() if region.any() else logits.new_zeros(()) * logits.sum()


def _head_kind(class_id: int) -> str:
    """The head branch holding target ``class_id``'s score."""
    if class_id >= 0:
        return "cls_head"
    return "box_head" if class_id > MASK else "mask_head" if class_id == MASK else "pose_head"
