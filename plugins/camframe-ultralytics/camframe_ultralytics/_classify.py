"""Ultralytics classify models (``ClassificationModel``) through the classifier path."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.functional import pad

from camframe import ClassifierAdapter
from camframe.adapters import upsample


class YOLOClassifyAdapter(ClassifierAdapter):
    """YOLO classify models (``yolov8n-cls``, ``yolo11n-cls``...): the target is a class logit.

    Preprocessing is Ultralytics' own (``classify_transforms``: the shorter side resized to
    ``imgsz``, the centre cropped); maps cover the crop and are zero outside it on the original.
    Works on a private float32 copy in eval mode.
    """

    name = "ultralytics-classify"
    priority = -10
    defaults: dict[str, Any] = {"imgsz": None}
    option_types = {"imgsz": int}
    option_minimums = {"imgsz": 1}
    cli_options = {"imgsz": "model input size"}

    def __init__(self) -> None:
        super().__init__(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self.options = dict(self.defaults)

    def matches(self, model: Any) -> bool:
        try:
            from ultralytics.engine.model import Model
            from ultralytics.nn.tasks import ClassificationModel
        except ImportError:
            return False
        return isinstance(model.model if isinstance(model, Model) else model, ClassificationModel)

    def prepare(self, model: Any) -> nn.Module:
        from ultralytics.engine.model import Model

        private = copy.deepcopy(model.model if isinstance(model, Model) else model).float().eval()
        names = private.names
        self.categories = [names[i] for i in range(len(names))] if isinstance(names, dict) else list(names)
        args = getattr(private, "args", None)
        size = self.options["imgsz"] or (args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None))
        self.size = int(size if isinstance(size, int) else max(size)) if size else 224
        return private

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module) -> tuple[Tensor, list[dict]]:
        from PIL import Image
        from ultralytics.data.augment import classify_transforms

        transform = classify_transforms(self.size)
        batch = torch.stack([transform(Image.fromarray(np.ascontiguousarray(im))) for im in images])
        return batch, [self._crop_meta(im.shape[:2]) for im in images]

    def _crop_meta(self, size: tuple[int, ...]) -> dict[str, Any]:
        """Where torchvision's ``Resize(imgsz)`` + ``CenterCrop(imgsz)`` put the input in the
        resized image: its ``resized`` (h, w) and the crop's ``offset`` (top, left)."""
        short, long = min(size[:2]), max(size[:2])
        other = int(self.size * long / short)
        resized = (self.size, other) if size[0] <= size[1] else (other, self.size)
        offset = [int(round((r - self.size) / 2.0)) for r in resized]
        return {"size": tuple(size[:2]), "resized": resized, "offset": offset}

    def to_original(self, maps: Tensor, meta: dict) -> Tensor:
        """The crop's maps placed in the resized image (zero outside the crop), resized to the original."""
        (top, left), (h, w) = meta["offset"], meta["resized"]
        padded = pad(maps, (left, w - left - maps.shape[-1], top, h - top - maps.shape[-2]))
        return upsample(padded, meta["size"])

    @staticmethod
    def logits(outputs: Any) -> Tensor:
        """The logits: in eval mode the head returns ``(probabilities, logits)``."""
        return ClassifierAdapter.logits(outputs[1] if isinstance(outputs, tuple) else outputs)
