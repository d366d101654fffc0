"""RT-DETR: one target per kept decoder query, its class logit; no NMS."""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from camframe import Adapter, CamframeError, Detection, Target

from ._adapter import YOLOAdapter


class RTDETRAdapter(YOLOAdapter):
    """Ultralytics RT-DETR (``RTDETRDecoder`` head): the decoder's top-k (query, class) pairs above
    ``conf`` are the detections, as ``predict()`` keeps them; the target of a detection and class
    *c* is the last decoder layer's class-*c* logit of its query. Default layers: the hybrid
    encoder's multi-scale maps that feed the decoder. Images are stretched to ``imgsz`` square."""

    name = "ultralytics-rtdetr"
    aggregate, normalise = "avg", "layer"  # not measured for RT-DETR: the YOLO defaults before the evaluation
    defaults = {k: v for k, v in YOLOAdapter.defaults.items() if k not in ("iou", "agnostic", "nms", "rect")}
    option_types = {"imgsz": int}
    cli_options = {k: v for k, v in YOLOAdapter.cli_options.items() if k != "iou"}

    def matches(self, model: Any) -> bool:
        try:
            from ultralytics.engine.model import Model
            from ultralytics.nn.modules.head import RTDETRDecoder
        except ImportError:
            return False
        inner = model.model if isinstance(model, Model) else model
        return isinstance(getattr(inner, "model", None), nn.Sequential) and isinstance(inner.model[-1], RTDETRDecoder)

    def anchor(self, target: Target, outputs: Any) -> None:
        """A query attends to the whole image: its support is unbounded, never grouped."""
        return None

    def prepare(self, model: Any) -> nn.Module:
        from ultralytics.engine.model import Model

        private = copy.deepcopy(model.model if isinstance(model, Model) else model).float().eval()
        names = private.names
        self.names = [names[i] for i in range(len(names))] if isinstance(names, dict) else list(names)
        args = getattr(private, "args", None)
        size = self.options["imgsz"] or (args.get("imgsz") if isinstance(args, dict) else None) or 640
        self.imgsz = int(size if isinstance(size, int) else max(size))
        if self.imgsz % 32:
            raise CamframeError(f"imgsz {self.imgsz} is not a multiple of the model's stride 32")
        return private

    @property
    def fidelity(self) -> str:
        """How the detections relate to Ultralytics' own ``predict()``."""
        o = self.options
        return (f"as Ultralytics predict(imgsz={self.imgsz}, conf={o['conf']}, max_det={o['max_det']}) in float32: "
                "the image stretched to the square, as RT-DETR's predict() does")

    def layers(self, model: nn.Module) -> list[str]:
        return self.layer_presets(model)["head-inputs"]

    def resolve_classes(self, classes: Sequence[int | str], model: nn.Module) -> list[int]:
        return Adapter.resolve_classes(self, classes, model)

    def target_name(self, class_id: int, model: nn.Module) -> str:
        return self.names[class_id]

    def preprocessor(self, model: nn.Module) -> Callable[[Sequence[np.ndarray]], tuple[Tensor, list[dict]]]:
        """``preprocess``, which needs nothing of the model."""
        return functools.partial(self.preprocess, model=None)

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module | None) -> tuple[Tensor, list[dict]]:
        from ultralytics.data.augment import LetterBox

        letterbox = LetterBox((self.imgsz, self.imgsz), auto=False, scale_fill=True)
        batch = np.stack([letterbox(image=im) for im in images])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255)
        return x, [self.meta(im.shape[:2], (self.imgsz, self.imgsz), (0, 0), (self.imgsz, self.imgsz)) for im in images]

    def detect(self, outputs: Any, metas: list[dict], model: nn.Module,
               conf: float | None = None) -> list[list[Detection]]:
        conf = self.options["conf"] if conf is None else conf
        boxes, logits = outputs[1][0][-1].detach(), outputs[1][1][-1].detach()
        nc = logits.shape[-1]
        scores, index = logits.sigmoid().flatten(1).topk(logits.shape[1], dim=1)  # as predict(): num_queries pairs
        detections = []
        for b, meta in enumerate(metas):
            dets = []
            for score, i in zip(scores[b].tolist(), index[b].tolist()):
                if score <= conf or len(dets) >= self.options["max_det"]:
                    break
                query, cls = divmod(i, nc)
                cx, cy, w, h = (boxes[b, query] * self.imgsz).tolist()
                box = self.box_to_original((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), meta)
                probs = logits[b, query].sigmoid().float().cpu()  # with a background entry, as YOLO's (drise)
                dets.append(Detection(box, cls, self.names[cls], score, query, {"query": query},
                                      torch.cat([probs, 1 - probs.max()[None]])))
            detections.append(dets)
        return detections

    def score(self, outputs: Any, targets: list[Target]) -> Tensor:
        """Each target's class logit of its query, from the last decoder layer."""
        logits = outputs[1][1][-1]
        return torch.stack([logits[t.image, t.detection.index, t.class_id]  # type: ignore[union-attr]
                            for t in targets])
