"""The YOLO adapter: letterbox, NMS with anchor indices, per-box per-class logit targets."""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from camframe import CamframeError, Detection, DetectorAdapter, Target

# Box-regression targets: the distance from a box's anchor to each side (DFL expectation, grid units).
SIDES = ("box.left", "box.top", "box.right", "box.bottom")
_DEFAULTS: dict[str, Any] = {"conf": 0.25, "iou": 0.7, "imgsz": None, "max_det": 300, "agnostic": False, "nms": None}


def _parts() -> tuple[type, type, type, type]:
    from ultralytics.engine.model import Model
    from ultralytics.nn.modules.head import OBB, Detect
    from ultralytics.nn.tasks import DetectionModel

    return Model, DetectionModel, Detect, OBB


class YOLOAdapter(DetectorAdapter):
    """Ultralytics Detect-head models (YOLOv5u, v8, v10, 11, 26; their seg and pose variants).

    Works on a private float32 copy in eval mode: the user's model is never fused, trained or
    put under ``inference_mode``. The target of box *k* and class *c* is the class logit at the
    anchor that produced box *k*. End-to-end heads (YOLOv10, YOLO26) follow the branch the model
    is set to use, as ``predict()`` does: by default the one-to-many branch with NMS; option
    ``nms=False`` selects the one-to-one branch, whose top-k replaces NMS. In eval mode neither
    branch is detached, so gradients reach the neck either way.
    """

    name = "ultralytics"
    priority = -10
    aggregate = "avg"  # with the neck layers: chosen by docs/evaluation.md (deletion/insertion, sanity check)
    guided = False
    allow_unreached = True

    defaults = _DEFAULTS
    option_types = {"imgsz": int, "nms": bool}  # their defaults are None (the model's own)
    cli_options = {**DetectorAdapter.cli_options, "iou": "NMS IoU threshold", "imgsz": "model input size"}

    def __init__(self) -> None:
        self.options = dict(_DEFAULTS)
        self.names: list[str] = []
        self.imgsz = 640
        self.end2end = False

    def configure(self, **options: Any) -> None:
        super().configure(**options)
        for key in ("max_det", "imgsz"):
            if self.options[key] is not None and self.options[key] < 1:
                raise CamframeError(f"{key} must be at least 1, got {self.options[key]}")

    def matches(self, model: Any) -> bool:
        try:
            Model, DetectionModel, Detect, OBB = _parts()
        except ImportError:
            return False
        inner = model.model if isinstance(model, Model) else model
        return isinstance(inner, DetectionModel) and isinstance(inner.model[-1], Detect) \
            and not isinstance(inner.model[-1], OBB)

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
        """Class ids, and the box sides' ids -1..-4 (``box.left``...): given by name or as ids."""
        sides = {name: -1 - i for i, name in enumerate(SIDES)}
        ids = []
        for c in classes:
            c = sides.get(c, c) if isinstance(c, str) else c
            side = isinstance(c, int) and -len(SIDES) <= c < 0
            ids += [c] if side else super().resolve_classes([c], model)
        return ids

    def target_name(self, class_id: int, model: nn.Module) -> str:
        return SIDES[-1 - class_id] if class_id < 0 else self.names[class_id]

    def example_input(self, model: nn.Module) -> Tensor:
        return torch.zeros(1, 3, self.imgsz, self.imgsz)

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module) -> tuple[Tensor, list[dict]]:
        from ultralytics.data.augment import LetterBox

        head = model.model[-1]
        letterbox = LetterBox((self.imgsz, self.imgsz), auto=False, stride=int(max(head.stride)))
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
        for meta, pred, idx in zip(metas, kept, keep):
            dets = []
            for row, anchor in zip(pred.tolist(), idx.tolist()):
                level, cls = int(torch.searchsorted(bounds, anchor, right=True)), int(row[5])
                dets.append(Detection(self.box_to_original(row[:4], meta), cls, self.names[cls], float(row[4]),
                                      int(anchor), {"stride": strides[level], "level": level}))
            detections.append(dets)
        return detections

    def _kept(self, outputs: Any, model: nn.Module, conf: float) -> tuple[list[Tensor], list[Tensor], dict]:
        """Per image, the kept rows ``[x1, y1, x2, y2, conf, class]`` (input pixels, best first) and
        their anchor indices: by NMS, or an end-to-end head's top-k; and the raw head output."""
        from ultralytics.utils.nms import non_max_suppression

        y, raw = self._branch(outputs)
        o = self.options
        if not self.end2end:
            kept, keep = non_max_suppression(y.detach().clone(), conf, o["iou"], None, o["agnostic"],
                                             max_det=o["max_det"], nc=len(self.names), return_idxs=True,
                                             max_time_img=math.inf)  # no time limit: a busy CPU must not drop boxes
            return kept, keep, raw
        head = model.model[-1]
        _, _, anchors = head.get_topk_index(raw["scores"].detach().sigmoid().permute(0, 2, 1), head.max_det)
        rows = [(pred[:, 4] > conf).nonzero().view(-1)[:o["max_det"]] for pred in y.detach()]
        return [y[b, r].detach().float() for b, r in enumerate(rows)], [anchors[b, r] for b, r in enumerate(rows)], raw

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
            kind = "box_head" if t.class_id < 0 else "cls_head"
            if (kind, level) not in cache:
                cache[kind, level] = self._heads[kind][level](feats[level])
            out = cache[kind, level][t.image, :, y, x]
            if t.class_id >= 0:
                scores.append(out[t.class_id])
            else:
                scores.append(self._dfl(out.reshape(1, -1, 1))[0, -1 - t.class_id, 0])
        return torch.stack(scores)
