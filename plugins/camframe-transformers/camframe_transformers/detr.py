"""Hugging Face DETR-family detectors (DETR, RT-DETR, RT-DETRv2) explained query by query.

``prepare`` returns a thin wrapper (``_Wrapped``) whose submodules are the model's own (layer
names as in the user's model, no parameter copied); its forward runs the model on a batch that
``preprocess`` resized and normalised as the model's image processor does, with DETR's pixel
mask. ``detect`` is the processor's ``post_process_object_detection`` keeping each detection's
query index, and a target's score is its query's class logit in ``outputs.logits``.
"""

from __future__ import annotations

import functools
import math
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from camframe import CamframeError, Detection, DetectorAdapter, Target
from camframe.adapters import IMAGENET_MEAN
from camframe.adapters import explaining

__all__ = ["HFDetrAdapter", "set_processor"]

# The image processor ``hf:`` loading found beside a checkpoint, or one given to ``set_processor``.
_PROCESSORS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def set_processor(model: nn.Module, processor: Any) -> None:
    """Preprocess ``model``'s images with ``processor``'s settings (size, mean/std) instead of the defaults."""
    _PROCESSORS[model] = processor


def _families() -> dict[type, str]:
    """Model class -> ``"detr"`` (softmax) or ``"rtdetr"`` (sigmoid top-k)."""
    import transformers as hf

    names = {"DetrForObjectDetection": "detr", "RTDetrForObjectDetection": "rtdetr",
             "RTDetrV2ForObjectDetection": "rtdetr"}
    return {getattr(hf, n): f for n, f in names.items() if hasattr(hf, n)}


def _family(model: Any) -> str | None:
    return next((f for cls, f in _families().items() if isinstance(model, cls)), None)


@dataclass(frozen=True)
class _Processing:
    """An image processor's resize and normalisation: ``size`` as its size dict; ``mean``/``std``
    already divided by the rescale factor when both apply (as the processor fuses them)."""

    size: dict[str, int]
    interpolation: Any
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def of(cls, processor: Any, size: int | None, max_size: int | None) -> _Processing:
        from transformers.image_utils import pil_torch_interpolation_mapping

        given = {k: v for k, v in dict(processor.size).items() if v is not None}
        if size is not None:  # the option: DETR's shortest edge, RT-DETR's square side
            given = {"height": size, "width": size} if "height" in given else {**given, "shortest_edge": size}
        if max_size is not None:
            given["longest_edge"] = max_size
        if not ({"height", "width"} <= set(given) or "shortest_edge" in given):
            raise CamframeError(f"image processor size {given} is not supported; give -O size=N")
        rescale = processor.rescale_factor if processor.do_rescale else None
        mean = std = None
        if processor.do_normalize:
            factor = 1 / rescale if rescale else 1.0
            mean = tuple(m * factor for m in processor.image_mean)
            std = tuple(s * factor for s in processor.image_std)
            rescale = None
        return cls(given, pil_torch_interpolation_mapping[processor.resample], rescale, mean, std)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The resized (h, w) of an image, as the processor computes it."""
        from transformers.image_transforms import get_size_with_aspect_ratio

        if "height" in self.size:
            return self.size["height"], self.size["width"]
        return get_size_with_aspect_ratio((height, width), self.size["shortest_edge"], self.size.get("longest_edge"))

    def __call__(self, image: np.ndarray, device: torch.device) -> Tensor:
        """One RGB uint8 image -> the processor's float tensor (resized as uint8, then rescaled/normalised)."""
        from torchvision.transforms.v2 import functional as tvF

        x = torch.tensor(image, device=device).permute(2, 0, 1)  # a copy: the image may be read-only
        x = tvF.resize(x, list(self.output_size(*x.shape[-2:])), interpolation=self.interpolation, antialias=True)
        x = x.float()
        if self.mean is not None and self.std is not None:
            return (x - x.new_tensor(self.mean)[:, None, None]) / x.new_tensor(self.std)[:, None, None]
        return x * self.rescale if self.rescale else x


def _pixel_mask(x: Tensor) -> Tensor:
    """DETR's pixel mask of a batch padded at the bottom and right with zeros: each image's rows
    and columns up to its last one holding a non-zero value (an all-zero image: everything)."""
    filled = x.ne(0).any(1)
    height, width = x.shape[-2:]
    rows = height - filled.any(2).flip(1).int().argmax(1)
    cols = width - filled.any(1).flip(1).int().argmax(1)
    rows = torch.where(filled.flatten(1).any(1), rows, height)
    cols = torch.where(filled.flatten(1).any(1), cols, width)
    inside_rows = torch.arange(height, device=x.device) < rows[:, None]
    inside_cols = torch.arange(width, device=x.device) < cols[:, None]
    return (inside_rows[:, :, None] & inside_cols[:, None, :]).long()


def _batch(processing: _Processing, images: Sequence[np.ndarray], device: torch.device
           ) -> tuple[Tensor, list[dict]]:
    """Images processed and padded at the bottom and right with zeros into one batch, and their metas."""
    resized = [processing(im, device) for im in images]
    height, width = max(x.shape[1] for x in resized), max(x.shape[2] for x in resized)
    batch = resized[0].new_zeros(len(resized), 3, height, width)
    for b, x in enumerate(resized):
        batch[b, :, :x.shape[1], :x.shape[2]] = x
    metas = [DetectorAdapter.meta(im.shape[:2], (height, width), content=x.shape[-2:])
             for im, x in zip(images, resized)]
    return batch, metas


class _Wrapped(nn.Module):
    """The model's own submodules; forward = the model on a preprocessed batch (DETR: with the
    pixel mask of its padding), recording its input size and the encoder's token grid."""

    def __init__(self, model: nn.Module, family: str) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["detector"] = model  # not a submodule: the names stay the model's own
        self.family = family
        self.grid: tuple[int, int] | None = None
        self.input_size = (1, 1)
        self.presets: dict[str, list[str]] = {}  # found by running the model once

    def forward(self, x: Tensor) -> Any:
        self.input_size = tuple(x.shape[-2:])
        mask = _pixel_mask(x) if self.family == "detr" else None
        outputs = self.detector(pixel_values=x, pixel_mask=mask)
        tokens = getattr(outputs, "encoder_last_hidden_state", None)
        if isinstance(tokens, Tensor) and tokens.ndim == 3:
            self.grid = _grid(tokens.shape[1], *x.shape[-2:])
        return outputs


def _grid(tokens: int, height: int, width: int) -> tuple[int, int] | None:
    """The (h, w) of a stride-2^k feature map of a ``height`` x ``width`` input that has ``tokens`` cells."""
    for k in range(1, 8):
        h, w = math.ceil(height / 2 ** k), math.ceil(width / 2 ** k)
        if h * w == tokens:
            return h, w
    return None


def _backbone_stages(model: _Wrapped) -> list[str]:
    """The outermost backbone modules whose outputs are the feature maps the encoder reads (DETR:
    the last one), found by running the backbone alone on a small blank image."""
    named = [(n, m) for n, m in model.named_modules() if n.startswith("model.backbone.")]
    outputs: dict[int, str] = {}

    def output(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple, out: Any) -> None:
            outputs[id(out)] = name  # a module finishes after those inside it: the outermost stays
        return record

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    handles = [m.register_forward_hook(output(n)) for n, m in named]
    try:
        with explaining(model), torch.no_grad():
            features = model.model.backbone(torch.zeros(1, 3, 64, 64, device=device),
                                            torch.ones(1, 64, 64, dtype=torch.long, device=device))
            maps = [f for f, _ in features][-1 if model.family == "detr" else 0:]
            return [outputs[id(f)] for f in maps if id(f) in outputs]
    finally:
        for h in handles:
            h.remove()


class HFDetrAdapter(DetectorAdapter):
    """Hugging Face ``DetrForObjectDetection``, ``RTDetrForObjectDetection`` and
    ``RTDetrV2ForObjectDetection``.

    Images are preprocessed as the model's image processor does (its resize, rescale and
    normalisation, in torch; DETR's padding with a pixel mask): the processor ``hf:`` loading found
    beside the checkpoint or one given to ``set_processor``, else the family's default
    (``DetrImageProcessor``: shortest edge 800, longest 1333, ImageNet mean/std;
    ``RTDetrImageProcessor``: 640 x 640, no normalisation); option ``size`` (and ``max_size``)
    overrides the size. Detections are ``post_process_object_detection``'s (DETR: softmax without
    the no-object class, one per query; RT-DETR: sigmoid, top (query, class) pairs) above ``conf``,
    best first, with the query as ``Detection.index``. The target of a detection and class *c* is
    its query's class-*c* logit. Default layers: DETR, the last encoder layer (the memory the decoder
    reads), as a map; RT-DETR, the hybrid encoder's multi-scale outputs.
    """

    name = "transformers-detr"
    priority = -10
    guided = False
    target_score_kind = "logit"  # the query's class logit (DETR: of a softmax; RT-DETR: of a sigmoid)
    defaults: dict[str, Any] = {"conf": 0.5, "size": None, "max_size": None}
    option_types = {"size": int, "max_size": int}
    option_minimums = {"size": 32, "max_size": 32}

    def __init__(self) -> None:
        self.options = dict(self.defaults)
        self.names: list[str] = []

    def matches(self, model: Any) -> bool:
        if "transformers" not in sys.modules:  # a transformers model cannot exist without it
            return False
        try:
            return _family(model) is not None
        except Exception:  # never raise from matches
            return False

    def prepare(self, model: nn.Module) -> nn.Module:
        family = _family(model)
        if family is None:
            raise CamframeError(f"{type(model).__name__} is not a DETR-family detector")
        processor = _PROCESSORS.get(model)
        if processor is None:
            processor = self._default_processor(family)
        self.processing = _Processing.of(processor, self.options["size"], self.options["max_size"])
        config = model.config
        self.softmax = family == "detr" or not getattr(config, "use_focal_loss", True)
        self.names = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
        self.allow_unreached = family != "detr"  # deformable attention samples a few points per level
        self.fill_value = 0.0 if self.processing.mean is not None else IMAGENET_MEAN  # the mean pixel
        self._model = _Wrapped(model, family)
        return self._model

    @staticmethod
    def _default_processor(family: str) -> Any:
        from transformers import DetrImageProcessor, RTDetrImageProcessor

        return DetrImageProcessor() if family == "detr" else RTDetrImageProcessor()

    def layer_presets(self, model: nn.Module) -> dict[str, list[str]]:
        """``encoder``: the default layers; ``backbone``: the backbone stages the encoder reads."""
        if "backbone" not in model.presets:
            model.presets["backbone"] = _backbone_stages(model)
        return {"encoder": self.layers(model), "backbone": list(model.presets["backbone"])}

    def layers(self, model: nn.Module) -> list[str]:
        """DETR: the last encoder layer (no encoder: its input projection); RT-DETR: the hybrid
        encoder's outputs, from the last FPN block (stride 8) and the PAN blocks."""
        if model.family == "detr":
            count = len(model.model.encoder.layers)
            return [f"model.encoder.layers.{count - 1}"] if count else ["model.input_projection"]
        stages = len(model.model.encoder.pan_blocks)
        return [f"model.encoder.fpn_blocks.{stages - 1}", *(f"model.encoder.pan_blocks.{i}" for i in range(stages))]

    def feature_map(self, layer: str, tensor: Tensor) -> Tensor:
        """DETR's encoder tokens ``(B, h*w, C)`` laid out on the backbone's grid."""
        grid = self._model.grid
        if tensor.ndim != 3 or grid is None:
            return tensor
        if tensor.shape[1] != grid[0] * grid[1]:
            raise CamframeError(f"layer {layer!r}: {tensor.shape[1]} tokens do not fill the {grid[0]}x{grid[1]} grid")
        return tensor.transpose(1, 2).reshape(len(tensor), tensor.shape[2], *grid)

    def class_names(self, model: nn.Module) -> list[str]:
        return self.names

    def example_input(self, model: nn.Module) -> Tensor:
        size = self.processing.size
        edge = size.get("shortest_edge")
        return torch.zeros(1, 3, size.get("height", edge), size.get("width", edge))

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module) -> tuple[Tensor, list[dict]]:
        """The processor's resize and normalisation; images padded at the bottom and right with zeros."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return _batch(self.processing, images, device)

    def preprocessor(self, model: nn.Module) -> Callable[[Sequence[np.ndarray]], tuple[Tensor, list[dict]]]:
        """The same on the CPU (for worker processes): only the processing settings are bound."""
        return functools.partial(_batch, self.processing, device=torch.device("cpu"))

    def detect(self, outputs: Any, metas: list[dict], model: nn.Module,
               conf: float | None = None) -> list[list[Detection]]:
        conf = self.options["conf"] if conf is None else conf
        logits, boxes = outputs.logits.detach(), outputs.pred_boxes.detach()
        return [self._detections(logits[b], boxes[b], meta, model.input_size, conf) for b, meta in enumerate(metas)]

    def candidate(self, outputs: Any, metas: list[dict], model: nn.Module, image: int,
                  box: Sequence[float], class_id: int | None) -> Detection | None:
        """The query ``pick_candidate`` picks by its box and class probabilities, before ``conf``."""
        logits, meta = outputs.logits[image].detach(), metas[image]
        probs = logits.softmax(-1)[:, :-1] if self.softmax else logits.sigmoid()
        full = torch.cat([probs, 1 - probs.amax(1, keepdim=True)], 1) if not self.softmax else logits.softmax(-1)
        (height, width), (sy, sx) = meta.get("size", model.input_size), meta.get("scale", (1.0, 1.0))
        cx, cy, w, h = (outputs.pred_boxes[image].detach() * torch.tensor([width * sx, height * sy] * 2,
                                                                           device=logits.device)).unbind(1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        picked = self.pick_candidate(boxes, probs, self.box_to_input(box, meta) if meta else box, class_id)
        if picked is None:
            return None
        query, cls = picked
        own = boxes[query].tolist()
        return Detection(self.box_to_original(own, meta) if meta else tuple(own), cls, self.names[cls],
                         float(probs[query, cls]), query, probs=full[query].cpu())

    def _detections(self, logits: Tensor, boxes: Tensor, meta: dict, input_size: tuple[int, int],
                    conf: float) -> list[Detection]:
        """``post_process_object_detection`` of one image, best first, keeping each query."""
        if self.softmax:  # the last class is "no object"
            probs = logits.softmax(-1)
            scores, labels = probs[:, :-1].max(-1)
            scores, queries = scores.sort(descending=True)
            labels = labels[queries]
        else:
            sigmoid = logits.sigmoid()
            scores, index = sigmoid.flatten().topk(len(logits))
            queries, labels = index // logits.shape[1], index % logits.shape[1]
            probs = torch.cat([sigmoid, 1 - sigmoid.amax(1, keepdim=True)], 1)  # a last background entry
        keep = scores > conf
        # boxes are relative to the image's own (unpadded) content; no meta: an already preprocessed batch
        (height, width), (sy, sx) = meta.get("size", input_size), meta.get("scale", (1.0, 1.0))
        height, width = height * sy, width * sx
        dets = []
        for score, query, label in zip(scores[keep].tolist(), queries[keep].tolist(), labels[keep].tolist()):
            cx, cy, w, h = boxes[query].tolist()
            box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
            dets.append(Detection(self.box_to_original(box, meta) if meta else box, label, self.names[label],
                                  score, query, probs=probs[query].cpu()))
        return dets

    def score(self, outputs: Any, targets: list[Target]) -> Tensor:
        """Each target's class logit at its query (the last decoder layer's)."""
        logits = outputs.logits
        picked = [logits[t.image, t.detection.index, t.class_id] for t in targets]  # type: ignore[union-attr]
        return torch.stack(picked)
