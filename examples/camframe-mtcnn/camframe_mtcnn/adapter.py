"""The camframe adapter for ``MTCNNDetector``: one explanation per detected face."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from camframe import Detection, DetectorAdapter, Target

_DEFAULTS: dict[str, Any] = {"conf": 0.7, "max_size": 1280}


class MTCNNAdapter(DetectorAdapter):
    """Explains each face MTCNN finds through the PNet window that proposed it.

    MTCNN is a cascade: PNet slides a 12-pixel window over an image pyramid; RNet and ONet
    re-score and refine crops of what it proposes. Only PNet sees the image as a feature map, so
    a face's target is PNet's face logit at the pyramid level and output cell that proposed it.
    The default layer is ``pnet.prelu2``: each window sees 3 x 3 of its cells, so the map shows
    which part of the window made PNet say "face" (``pnet.prelu3`` feeds the logit through a
    1 x 1 convolution, so its map is a single cell: where the window is, nothing more). PNet runs
    once per level, so camframe records the layer once per level (``pnet.prelu2#0``, ``#1``...);
    a face reaches only its own level's record, hence ``allow_unreached``.

    Options: ``conf`` (explain faces whose final probability is at least this; default 0.7, the
    cascade's own last threshold; rescoring for deletion/insertion keeps it too) and ``max_size``
    (a longer image side is shrunk to this).
    """

    name = "mtcnn"
    aggregate = "max"
    guided = False
    allow_unreached = True
    rescore_conf = None
    target_score_kind = "pnet-logit"  # PNet's face logit at the window that proposed the face

    defaults = _DEFAULTS

    def __init__(self) -> None:
        self.options = dict(_DEFAULTS)

    def matches(self, model: Any) -> bool:
        try:  # imported here: matches() is asked about every model, MTCNN or not
            from .model import MTCNNDetector
        except ImportError:
            return False
        return isinstance(model, MTCNNDetector)

    def layers(self, model: nn.Module) -> list[str]:
        return ["pnet.prelu2"]

    def layer_presets(self, model: nn.Module) -> dict[str, list[str]]:
        return {"pnet": ["pnet.prelu1", "pnet.prelu2", "pnet.prelu3"]}

    def class_names(self, model: nn.Module) -> list[str]:
        return ["face"]

    def example_input(self, model: nn.Module) -> Tensor:
        return torch.zeros(1, 3, 240, 320)

    def preprocessor(self, model: nn.Module) -> Callable[[Sequence[np.ndarray]], tuple[Tensor, list[dict]]]:
        """``preprocess`` needs nothing of the model: none is sent to spawned worker processes."""
        return functools.partial(self.preprocess, model=None)

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module | None) -> tuple[Tensor, list[dict]]:
        from .model import normalise

        limit = int(self.options["max_size"])
        resized = []
        for im in images:
            gain = min(1.0, limit / max(im.shape[:2]))
            size = (max(round(im.shape[1] * gain), 1), max(round(im.shape[0] * gain), 1))
            resized.append(im if gain == 1 else cv2.resize(im, size, interpolation=cv2.INTER_AREA))
        # one batch tensor: smaller images sit top-left on a grey (0 after normalising) canvas
        h, w = max(r.shape[0] for r in resized), max(r.shape[1] for r in resized)
        x = torch.zeros(len(images), 3, h, w)
        for b, r in enumerate(resized):
            x[b, :, :r.shape[0], :r.shape[1]] = normalise(torch.tensor(r).permute(2, 0, 1).float())
        return x, [self.meta(im.shape[:2], (h, w), content=r.shape[:2]) for im, r in zip(images, resized)]

    def detect(self, outputs: dict, metas: list[dict], model: nn.Module,
               conf: float | None = None) -> list[list[Detection]]:
        least = float(self.options["conf"] if conf is None else conf)
        detections: list[list[Detection]] = [[] for _ in metas]
        probs = outputs["probs"]
        for row in probs.argsort(descending=True).tolist():  # best first, so top:K means something
            b, prob = int(outputs["image"][row]), float(probs[row])
            if prob < least:
                continue
            level = int(outputs["level"][row])
            where = {"level": level, "scale": round(outputs["scales"][level], 5),
                     "cell": outputs["cell"][row].tolist()}  # the PNet window that proposed it
            box = self.box_to_original(outputs["boxes"][row].tolist(), metas[b])
            detections[b].append(Detection(box, 0, "face", prob, row, where))
        return detections

    def score(self, outputs: dict, targets: list[Target]) -> Tensor:
        scores = []
        for t in targets:
            row = t.detection.index  # type: ignore[union-attr]
            y, x = outputs["cell"][row].tolist()
            scores.append(outputs["logits"][int(outputs["level"][row])][t.image, y, x])
        return torch.stack(scores)
