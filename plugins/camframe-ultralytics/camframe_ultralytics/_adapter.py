"""The YOLO adapter: letterbox, NMS with anchor indices, per-box per-class logit targets."""

from __future__ import annotations

import copy
import dataclasses
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
_DEFAULTS: dict[str, Any] = {"conf": 0.25, "iou": 0.7, "imgsz": None, "max_det": 300, "agnostic": False, "nms": None,
                             "rect": True}
MASK_CHUNK = 32  # a Segment head's masks are made at input resolution this many at a time


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


def letterboxed(images: Sequence[np.ndarray], imgsz: int, rect: bool, stride: int
                ) -> tuple[Tensor | list[Tensor], list[dict]]:
    """Each image letterboxed as ``predict()`` letterboxes one image: to the smallest ``stride``-aligned
    rectangle within ``imgsz`` (``rect``) or to the ``imgsz`` square; per-image tensors where sizes differ."""
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox((imgsz, imgsz), auto=rect, stride=stride)
    boxed = [letterbox(image=im) for im in images]
    x = DetectorAdapter.batch([torch.from_numpy(b).permute(2, 0, 1).float().div_(255) for b in boxed])
    return x, [_letterbox_meta(im.shape[:2], b.shape[:2], imgsz) for im, b in zip(images, boxed)]


def _letterbox_meta(size: tuple[int, ...], input: tuple[int, ...], imgsz: int) -> dict[str, Any]:
    """Where ``LetterBox`` puts an image of ``size`` in an ``input``-sized one: resized by one gain
    (each side rounded), centred, as ``predict()`` maps boxes back (``scale_boxes``)."""
    gain = min(imgsz / size[0], imgsz / size[1])
    content = [max(round(s * gain), 1) for s in size[:2]]
    offset = [round((i - c) / 2 - 0.1) for i, c in zip(input[:2], content)]
    return DetectorAdapter.meta(size, input, offset, content)


class YOLOAdapter(DetectorAdapter):
    """Ultralytics Detect-head models (YOLOv5u, v8, v10, 11, 26; their seg, pose and OBB variants).

    Segment heads add target ``mask`` (the mean mask logit over the instance's mask), Pose heads
    ``kpt:NAME`` or ``kpt:INDEX`` (the keypoint's visibility logit, keypoints in ``extra``), OBB
    heads rotated NMS (the rotated box in ``extra["xywhr"]`` and ``extra["polygon"]``).

    Detections are ``predict()``'s with the same ``imgsz``, ``conf``, ``iou`` and ``max_det``: each
    image letterboxed to the smallest stride-aligned rectangle (option ``rect=False``: to the
    ``imgsz`` square, as ``predict(rect=False)``), boxes, masks' outlines (``extra["mask"]``),
    keypoints and rotated boxes mapped back to the original image's pixels as ``predict()`` maps
    them; ``fidelity`` says how they relate to ``predict()``.

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
        self.stride = 32

    @property
    def fidelity(self) -> str:
        """How the detections relate to Ultralytics' own ``predict()``."""
        o = self.options
        same = (f"Ultralytics predict(imgsz={self.imgsz}, conf={o['conf']}, iou={o['iou']}, max_det={o['max_det']}"
                f"{', rect=False' if not o['rect'] else ''}{', agnostic_nms=True' if o['agnostic'] else ''})")
        branch = "" if o["nms"] is None else f"; the {'NMS' if o['nms'] else 'top-k'} branch forced (option nms)"
        return (f"as {same} in float32, with no NMS time limit (predict() may drop boxes past it)"
                + ("; rect=False: a square letterbox, not predict()'s default rectangle" if not o["rect"] else "")
                + branch)

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
        self._stride0 = int(head.stride[0]) if hasattr(head, "stride") else 8  # the finest level's, for masks
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
        self.stride = max(stride, 32)  # the letterbox's alignment: predict()'s model stride is at least 32
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

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module) -> tuple[Tensor | list[Tensor], list[dict]]:
        return self.preprocessor(model)(images)

    def preprocessor(self, model: nn.Module
                     ) -> Callable[[Sequence[np.ndarray]], tuple[Tensor | list[Tensor], list[dict]]]:
        """``preprocess``, which needs nothing of the model (its stride was read in ``prepare``)."""
        return functools.partial(letterboxed, imgsz=self.imgsz, rect=self.options["rect"], stride=self.stride)

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
        input_boxes = raw.setdefault("camframe_input_boxes", {})  # (image, anchor): the box in input pixels
        detections = []
        for b, (meta, pred, idx) in enumerate(zip(metas, kept, keep)):
            # the masks' outlines: only for the detections themselves (not for rescoring's thousands)
            segments = self._segments(outputs, b, pred, meta) if self.masks and conf is None else None
            dets = []
            for k, (row, anchor, probs) in enumerate(zip(pred.tolist(), idx.tolist(), self._probs(outputs, b, idx))):
                if segments is not None and segments[k] is None:
                    continue  # predict() drops a box whose mask is empty
                input_boxes[b, int(anchor)] = row[:4]
                level, cls = int(torch.searchsorted(bounds, anchor, right=True)), int(row[5])
                box, extra = self._rotated(row, meta) if self.rotated else (self.box_to_original(row[:4], meta), {})
                if segments is not None:  # one outline, as predict()'s masks.xy: the manifest's polygon list
                    extra["mask"] = [segments[k]]
                dets.append(Detection(box, cls, self.names[cls], float(row[4]), int(anchor),
                                      {"stride": strides[level], "level": level, **extra, **self._extra(row, meta)},
                                      probs))
            detections.append(dets)
        return detections

    def candidate(self, outputs: Any, metas: list[dict], model: nn.Module, image: int,
                  box: Sequence[float], class_id: int | None) -> Detection | None:
        """The anchor before NMS and ``conf`` that ``pick_candidate`` picks by its decoded box and class
        scores (of the anchors overlapping ``box`` with IoU >= 0.5 the one scoring highest for ``class_id``,
        else the one overlapping it most). None for end-to-end and OBB heads (no NMS-free candidates here)."""
        if self.end2end or self.rotated:
            return None
        y, raw = self._branch(outputs)
        nc, meta = len(self.names), metas[image]
        pred = y[image].detach().float()
        xywh, scores = pred[:4].T, pred[4:4 + nc].T
        boxes = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        picked = self.pick_candidate(boxes, scores, self.box_to_input(box, meta), class_id)
        if picked is None:
            return None
        anchor, cls = picked
        bounds = torch.tensor([f.shape[-2] * f.shape[-1] for f in raw["feats"]]).cumsum(0)
        level = int(torch.searchsorted(bounds, anchor, right=True))
        probs = self._probs(outputs, image, torch.tensor([anchor], device=pred.device))[0]
        return Detection(self.box_to_original(boxes[anchor].tolist(), meta), cls, self.names[cls],
                         float(scores[anchor, cls]), anchor,
                         {"stride": float(model.model[-1].stride[level]), "level": level}, probs)

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

    def _segments(self, outputs: Any, b: int, pred: Tensor, meta: dict) -> list[list[list[float]] | None]:
        """Each kept row's mask outline ``[[x, y], ...]`` in original pixels, as ``predict()``'s
        ``masks.xy`` (the mask made at input resolution, its contours merged, mapped back); None where
        the mask is empty."""
        from ultralytics.utils.ops import masks2segments, process_mask, scale_coords

        proto = outputs[0][1][b].detach().float()
        out: list[list[list[float]] | None] = []
        for start in range(0, len(pred), MASK_CHUNK):
            chunk = pred[start:start + MASK_CHUNK].float()
            masks = process_mask(proto, chunk[:, 6:], chunk[:, :4], meta["input"], upsample=True)
            for mask, points in zip(masks, masks2segments(masks)):
                xy = scale_coords(meta["input"], points, meta["size"], normalize=False)
                out.append([[round(float(x), 2), round(float(y), 2)] for x, y in xy] if bool(mask.any()) else None)
        return out

    def _extra(self, row: list[float], meta: dict) -> dict[str, Any]:
        """A Pose head's keypoints ``[x, y, visibility]`` in original pixels."""
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
                box = self._input_box(outputs, t)
                scores.append(self._mask_score(out, outputs[0][1][t.image], box, feats[0].shape[-1] * self._stride0))
            elif t.class_id < MASK:
                scores.append(out[(KPT0 - t.class_id) * 3 + 2])
            else:
                scores.append(self._dfl(out.reshape(1, -1, 1))[0, -1 - t.class_id, 0])
        return torch.stack(scores)

    def anchor(self, target: Target, outputs: Any) -> tuple[Any, tuple[int, int], tuple[int, int]] | None:
        """The head branch and level, grid and cell a target's score is read at (``score``); a mask's
        mean logit (over the prototypes, from the whole finest level) is unbounded."""
        det = target.detection
        if det is None or det.index is None or target.class_id is None or target.class_id == MASK:
            return None
        feats = self._branch(outputs)[1]["feats"]
        level = det.extra["level"]
        height, width = feats[level].shape[-2:]
        offset = sum(f.shape[-2] * f.shape[-1] for f in feats[:level])
        return (_head_kind(target.class_id), level), (height, width), divmod(det.index - offset, width)

    def at_cell(self, target: Target, cell: tuple[int, int], outputs: Any) -> Target:
        assert target.detection is not None
        feats = self._branch(outputs)[1]["feats"]
        level = target.detection.extra["level"]
        offset = sum(f.shape[-2] * f.shape[-1] for f in feats[:level])
        index = offset + cell[0] * feats[level].shape[-1] + cell[1]
        return dataclasses.replace(target, image=0, detection=dataclasses.replace(target.detection, index=index))

    def _input_box(self, outputs: Any, t: Target) -> list[float]:
        """Target ``t``'s box in input pixels: as ``detect`` kept it from these outputs, else (a detection
        given from elsewhere) the box its anchor predicts in them."""
        y, raw = self._branch(outputs)
        assert t.detection is not None and t.detection.index is not None
        kept = raw.get("camframe_input_boxes", {}).get((t.image, t.detection.index))
        if kept is not None:
            return kept
        if self.end2end:
            raise CamframeError("a mask target of an end-to-end head needs its detection from this forward pass")
        cx, cy, w, h = y[t.image, :4, t.detection.index].tolist()
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]

    def _mask_score(self, coefficients: Tensor, proto: Tensor, box: list[float], width: int) -> Tensor:
        """The mean mask logit over the instance's mask: where the logit is positive inside its box
        (input pixels, of an input ``width`` wide), at the prototypes' resolution, as Ultralytics crops
        masks (the whole box if that is empty)."""
        logits = torch.einsum("c,chw->hw", coefficients, proto)
        h, w = logits.shape
        ratio = w / width
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
