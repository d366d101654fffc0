"""The camframe adapter for ``MTCNNDetector``: one explanation per detected face."""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camframe import Adapter, CamframeError, Detection, Target

_DEFAULTS: dict[str, Any] = {"conf": 0.7, "max_size": 1280}


class MTCNNAdapter(Adapter):
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
    cascade's own last threshold) and ``max_size`` (a longer image side is shrunk to this).
    """

    name = "mtcnn"
    aggregate = "max"
    guided = False
    allow_unreached = True

    defaults = _DEFAULTS

    def __init__(self) -> None:
        self.options = dict(_DEFAULTS)

    def configure(self, **options: Any) -> None:
        super().configure(**options)
        if not 0 <= float(self.options["conf"]) <= 1:
            raise CamframeError(f"conf must lie in [0, 1], got {self.options['conf']}")

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

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module) -> tuple[Tensor, list[dict]]:
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
        return x, [{"size": im.shape[:2], "input": r.shape[:2]} for im, r in zip(images, resized)]

    def to_original(self, maps: Tensor, meta: dict) -> Tensor:
        (h0, w0), (h, w) = meta["size"], meta["input"]
        crop = maps[..., :h, :w].reshape(-1, 1, h, w).float()
        return F.interpolate(crop, size=(h0, w0), mode="bilinear", align_corners=False).reshape(
            *maps.shape[:-2], h0, w0)

    def detect(self, outputs: dict, metas: list[dict], model: nn.Module) -> list[list[Detection]]:
        detections: list[list[Detection]] = [[] for _ in metas]
        probs = outputs["probs"]
        for row in probs.argsort(descending=True).tolist():  # best first, so top:K means something
            b, prob = int(outputs["image"][row]), float(probs[row])
            if prob < float(self.options["conf"]):
                continue
            (h0, w0), (h, w) = metas[b]["size"], metas[b]["input"]
            (x1, y1, x2, y2), sx, sy = outputs["boxes"][row].tolist(), w0 / w, h0 / h
            box = (max(x1 * sx, 0.0), max(y1 * sy, 0.0), min(x2 * sx, float(w0)), min(y2 * sy, float(h0)))
            level = int(outputs["level"][row])
            where = {"level": level, "scale": round(outputs["scales"][level], 5),
                     "cell": outputs["cell"][row].tolist()}  # the PNet window that proposed it
            detections[b].append(Detection(box, 0, "face", prob, row, where))
        return detections

    def targets(self, outputs: dict, detections: list[list[Detection]] | None, classes: list[int] | None,
                boxes: Any, model: nn.Module) -> list[Target]:
        targets = []
        for b, dets in enumerate(detections or []):
            if boxes == "all" or boxes is None:
                picked: Sequence[int] = range(len(dets))
            elif isinstance(boxes, str) and boxes.startswith("top:"):
                picked = range(min(int(boxes[4:]), len(dets)))
            else:
                picked = [k for k in boxes if 0 <= k < len(dets)]
            targets += [Target(b, 0, "face", box=k, detection=dets[k]) for k in picked]
        return targets

    def score(self, outputs: dict, targets: list[Target]) -> Tensor:
        scores = []
        for t in targets:
            row = t.detection.index  # type: ignore[union-attr]
            y, x = outputs["cell"][row].tolist()
            scores.append(outputs["logits"][int(outputs["level"][row])][t.image, y, x])
        return torch.stack(scores)
