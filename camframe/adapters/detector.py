"""The detector base: box picking, threshold checks, IoU-matched rescoring, mapping back to the image."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from camframe.adapters.base import Adapter, Detection, Target
from camframe.core.boxes import pair_iou
from camframe.core.aggregate import upsample
from camframe.core.errors import CamframeError

__all__ = ["Boxes", "DetectorAdapter", "select_boxes"]

CANDIDATE_IOU = 0.5  # a candidate overlapping the box at least this much is picked by score (pick_candidate)


@dataclass(frozen=True)
class Boxes:
    """Which detections of each image to explain: all (the default), the ``top`` K, or ``indices``."""

    top: int | None = None
    indices: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, value: Any) -> Boxes:
        """From ``"all"``, ``"top:K"``, ``"i,j,..."``, an index or a sequence of indices."""
        if isinstance(value, Boxes):
            return value
        if isinstance(value, str):
            return cls._parse_text(value.strip())
        items = list(value) if isinstance(value, (list, tuple, range, np.ndarray, Tensor)) else [value]
        return cls._of_indices(items, value)

    @classmethod
    def _parse_text(cls, text: str) -> Boxes:
        if text == "all":
            return cls()
        if text.startswith("top:"):
            if not text[4:].isdigit() or int(text[4:]) < 1:
                raise CamframeError(f"boxes {text!r}: expected top:K with a whole number K >= 1")
            return cls(top=int(text[4:]))
        try:
            return cls._of_indices([int(v) for v in text.split(",")], text)
        except ValueError:
            raise CamframeError(f"boxes {text!r}: expected all, top:K or comma-separated indices") from None

    @classmethod
    def _of_indices(cls, items: list[Any], given: Any) -> Boxes:
        items = [i.item() if isinstance(i, (Tensor, np.generic)) else i for i in items]
        if not items or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in items):
            raise CamframeError(f"boxes {given!r}: expected all, top:K or box indices")
        if min(items) < 0:
            raise CamframeError(f"boxes {given!r}: box indices count from 0 (box 0 is the most confident)")
        return cls(indices=tuple(dict.fromkeys(int(i) for i in items)))

    def pick(self, count: int) -> list[int]:
        """The picked box indices among ``count`` detections (indices beyond them are skipped)."""
        if self.indices is not None:
            return [k for k in self.indices if k < count]
        return list(range(count if self.top is None else min(self.top, count)))

    def __str__(self) -> str:
        if self.indices is not None:
            return ",".join(map(str, self.indices))
        return "all" if self.top is None else f"top:{self.top}"


class DetectorAdapter(Adapter):
    """Base of detector adapters: one target per picked box and class.

    A subclass supplies ``detect`` (detections best first, boxes mapped back with
    ``box_to_original``) and ``score``; its ``preprocess`` metas, made by ``meta``, carry ``size`` (the original
    ``(H, W)``), ``input`` (the batch's ``(H, W)``), ``offset`` (``(top, left)`` of the image in the
    input) and ``scale`` (``(sy, sx)``, input pixels per original pixel). Options ``conf`` and
    ``iou``, when an adapter declares them, must lie in [0, 1]. ``cli_options`` names the options
    the command line also offers as ``--NAME`` flags, with their help.
    """

    cli_options: dict[str, str] = {"conf": "detection confidence threshold"}
    rescore_conf: float | None = 0.001  # rescoring keeps detections down to this confidence (None: ``conf``)
    # each round of targets (a box per image) is a backward over the whole batch: on the CPU one image
    # at a time wastes none of them (docs/benchmarks.md)
    cpu_batch_size = 1

    def configure(self, **options: Any) -> None:
        super().configure(**options)
        for key in ("conf", "iou"):
            if self.options.get(key) is not None and not 0 <= float(self.options[key]) <= 1:  # None: the model's
                raise CamframeError(f"{key} must lie in [0, 1], got {self.options[key]}")

    def detect(self, outputs: Any, metas: list[dict], model: nn.Module,
               conf: float | None = None) -> list[list[Detection]]:
        """Detections per image, best first, with at least ``conf`` (default: option ``conf``)."""
        raise NotImplementedError

    def candidate(self, outputs: Any, metas: list[dict], model: nn.Module, image: int,
                  box: Sequence[float], class_id: int | None) -> Detection | None:
        """The model's best candidate for ``box`` (xyxy, original pixels) in image ``image``: its own
        pre-threshold prediction there (an anchor, point, proposal or query, chosen by ``pick_candidate``)
        as a ``Detection`` whose ``score`` is that of ``class_id`` (None: its best class), which ``score``
        can explain. Default: None, this family cannot give one (missed objects then go unexplained)."""
        return None

    def target_name(self, class_id: int, model: nn.Module) -> str:
        """The name of target class ``class_id``."""
        return self.class_names(model)[class_id]  # type: ignore[index]

    def targets(self, outputs: Any, detections: list[list[Detection]] | None, classes: list[int] | None,
                boxes: Boxes | None, model: nn.Module) -> list[Target]:
        """Each picked box of each image, with its own class or each of ``classes``."""
        picker = boxes or Boxes()
        targets = []
        for b, dets in enumerate(detections or []):
            for k in picker.pick(len(dets)):
                for c in [dets[k].class_id] if classes is None else classes:
                    targets.append(Target(b, c, self.target_name(c, model), box=k, detection=dets[k]))
        return targets

    def supported(self, target: Target) -> bool | None:
        """A box's own class is supported (the model detected it); another class is when the box's
        class probability for it (``Detection.probs``) reaches option ``conf``; without those, the
        default rule on the score (a logit above 0)."""
        det, conf, c = target.detection, getattr(self, "options", {}).get("conf"), target.class_id
        if det is not None and c == det.class_id:
            return True
        if det is not None and det.probs is not None and conf is not None and c is not None \
                and 0 <= c < len(det.probs):
            return float(det.probs[c]) >= float(conf)
        return super().supported(target)

    def rescore_threshold(self) -> float | None:
        """The confidence down to which perturbed images are detected (rescoring, ``drise``):
        ``rescore_conf``, or option ``conf`` where lower; None (the option) without ``rescore_conf``."""
        low = self.rescore_conf
        return None if low is None else min(self.options.get("conf", low), low)

    def rescore(self, outputs: Any, metas: list[dict], model: nn.Module, targets: list[Target]) -> Tensor:
        """Per row of a (perturbed) batch, the best detection of ``targets[row]``'s class with IoU > 0.5
        to its box, down to ``rescore_conf`` (for deletion/insertion); 0 when there is none."""
        detections = self.detect(outputs, metas, model, conf=self.rescore_threshold())
        scores = []
        for dets, t in zip(detections, targets):
            assert t.detection is not None
            scores.append(max((d.score for d in dets if d.class_id == t.class_id
                               and pair_iou(d.box, t.detection.box) > 0.5), default=0.0))
        return torch.tensor(scores)

    @staticmethod
    def meta(size: Sequence[int], input: Sequence[int], offset: Sequence[int] = (0, 0),
             content: Sequence[int] | None = None) -> dict[str, Any]:
        """The geometry of one image placed at ``offset`` (top, left) in an ``input``-sized batch,
        resized to ``content`` (h, w; default ``size``): what ``to_original`` and
        ``box_to_original`` read."""
        (h0, w0), (h, w) = size[:2], content or size[:2]
        return {"size": (int(h0), int(w0)), "input": (int(input[0]), int(input[1])),
                "offset": (int(offset[0]), int(offset[1])), "scale": (h / h0, w / w0)}

    @staticmethod
    def pick_candidate(boxes: Tensor, scores: Tensor, box: Sequence[float], class_id: int | None
                       ) -> tuple[int, int] | None:
        """The best candidate among ``boxes`` (N, 4; xyxy) with class ``scores`` (N, C) for ``box`` (same frame):
        of those overlapping it with IoU >= ``CANDIDATE_IOU``, the one scoring highest for ``class_id`` (None:
        for any class); where none does, the one overlapping it most (ties: the higher score). Its row and
        class; None without candidates."""
        if not len(boxes):
            return None
        b, q = boxes.float(), torch.tensor(list(box), dtype=torch.float32, device=boxes.device)
        w = (torch.minimum(b[:, 2], q[2]) - torch.maximum(b[:, 0], q[0])).clamp(min=0)
        h = (torch.minimum(b[:, 3], q[3]) - torch.maximum(b[:, 1], q[1])).clamp(min=0)
        union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + (q[2] - q[0]) * (q[3] - q[1]) - w * h
        iou = torch.where(union > 0, w * h / union.clamp(min=1e-12), torch.zeros_like(union))
        score = scores[:, class_id] if class_id is not None else scores.amax(1)
        near = iou >= CANDIDATE_IOU
        if bool(near.any()):
            row = int(torch.where(near, score, torch.full_like(score, -math.inf)).argmax())
        else:
            best = iou == iou.max()
            row = int(torch.where(best, score, torch.full_like(score, -math.inf)).argmax())
        return row, int(class_id if class_id is not None else scores[row].argmax())

    @staticmethod
    def box_to_input(box: Sequence[float], meta: dict) -> list[float]:
        """An xyxy box in original-image pixels -> input pixels (``box_to_original``'s inverse, unclipped)."""
        (top, left), (sy, sx) = meta["offset"], meta["scale"]
        return [box[0] * sx + left, box[1] * sy + top, box[2] * sx + left, box[3] * sy + top]

    @staticmethod
    def box_to_original(box: Sequence[float], meta: dict) -> tuple[float, float, float, float]:
        """An xyxy box in input pixels -> original-image pixels, clipped to the image."""
        (top, left), (sy, sx), (h0, w0) = meta["offset"], meta["scale"], meta["size"]
        x1, y1, x2, y2 = box
        clip = lambda v, hi: min(max(v, 0.0), float(hi))  # noqa: E731
        return (clip((x1 - left) / sx, w0), clip((y1 - top) / sy, h0),
                clip((x2 - left) / sx, w0), clip((y2 - top) / sy, h0))

    def to_original(self, maps: Tensor, meta: dict) -> Tensor:
        """Crop the image's region (``offset``, ``scale``) out of the input, resize it to ``size``."""
        (top, left), (sy, sx), (h0, w0) = meta["offset"], meta["scale"], meta["size"]
        nh, nw = max(round(h0 * sy), 1), max(round(w0 * sx), 1)
        return upsample(maps[..., top:top + nh, left:left + nw], meta["size"])


def select_boxes(adapter: Adapter, boxes: Any) -> Boxes | None:
    """``boxes`` parsed for ``adapter``: all boxes by default for a detector; refused for a classifier."""
    if not isinstance(adapter, DetectorAdapter):
        if boxes is not None:
            raise CamframeError(f"boxes apply to detectors; adapter {adapter.name!r} explains whole images")
        return None
    return Boxes() if boxes is None else Boxes.parse(boxes)
