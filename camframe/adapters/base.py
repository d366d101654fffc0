"""What an adapter supplies for one model family, and the classifier adapter everything shares."""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from camframe.core import ragged
from camframe.core import validate as _validate
from camframe.core.aggregate import upsample
from camframe.core.capture import _first_tensor
from camframe.core.errors import CamframeError

__all__ = ["Adapter", "ClassifierAdapter", "Detection", "Rect", "Target"]

Rect = tuple[int, int, int, int]  # rows y0..y1 and columns x0..x1 (inclusive) of one layer's map

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Detection:
    """One detected object: ``box`` is xyxy in original-image pixels. ``probs``, where the adapter
    gives it, is the detection's class-probability vector, indexed by class id (an adapter may
    append a last background entry, the probability of no object): what ``drise`` compares."""

    box: tuple[float, float, float, float]
    class_id: int
    class_name: str
    score: float
    index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    probs: Tensor | None = field(default=None, repr=False, compare=False)


@dataclass
class Target:
    """One thing to explain: a class (of one box, for detectors) in one image."""

    image: int
    class_id: int | None
    class_name: str
    box: int | None = None
    detection: Detection | None = None
    score: float = float("nan")
    subject: tuple[str, int] | None = None  # ("missed", k) or ("user_box", k): what box it explains (camframe.engine.outcomes)
    contrast: int | None = None  # a class whose score is subtracted from this one's (same box)


class Adapter:
    """Base adapter: how to load, preprocess, pick layers and score targets for a model family.

    Subclasses override what differs. ``priority`` orders automatic matching (third-party
    adapters keep the default 0 and so win over camframe's built-ins, which use lower values).
    """

    name = "base"
    priority = 0
    method = "elementwise"
    aggregate = "max"
    fill_value: float | tuple[float, ...] = 0.0  # a neutral input pixel (0: the mean, for mean-normalised inputs)
    normalise = "layer"  # how layers are put on one scale before aggregation: "common" or "layer"
    guided = True
    allow_unreached = False
    fidelity: str | None = None  # how its detections or scores relate to the model's own inference, where it says
    cpu_batch_size = 8  # images per forward pass by default on the CPU (a GPU's default is 8)
    defaults: dict[str, Any] = {}  # the options ``configure`` takes, with their default values
    option_types: dict[str, type] = {}  # the type of an option whose default is None (else: the default's)
    option_minimums: dict[str, int] = {}  # the least value of a numeric option (None stays allowed)
    cli_options: dict[str, str] = {}  # options the command line also offers as ``--NAME`` flags, with their help
    target_score_kind = "logit"  # what a target's score is (the manifest's ``target_score_kind``)
    skeleton: Sequence[tuple[int, int]] = ()  # keypoint index pairs (0-based) joined by lines in drawings

    def matches(self, model: Any) -> bool:
        """Whether this adapter knows ``model``."""
        return False

    def configure(self, **options: Any) -> None:
        """Take adapter options (thresholds, input size...) into ``self.options``; the ones an
        adapter knows are the keys of its ``defaults``, any other is an error."""
        unknown = set(options) - set(self.defaults)
        if unknown:
            known = f"; known: {', '.join(self.defaults)}" if self.defaults else ""
            raise CamframeError(f"adapter {self.name!r} takes no option {', '.join(sorted(unknown))}{known}")
        self.options = {**self.defaults, **getattr(self, "options", {}), **_validate.option_values(self, options)}
        for key, least in self.option_minimums.items():
            if self.options.get(key) is not None and self.options[key] < least:
                raise CamframeError(f"{key} must be at least {least}, got {self.options[key]}")

    def prepare(self, model: Any) -> nn.Module:
        """The ``nn.Module`` to explain (a wrapper's inner model, say); must not alter ``model``."""
        return model

    def layers(self, model: nn.Module) -> list[str]:
        """Default layers to explain."""
        raise NotImplementedError

    def layer_presets(self, model: nn.Module) -> dict[str, list[str]]:
        """Named layer sets (e.g. ``neck``) a user may ask for instead of layer names."""
        return {}

    def anchor(self, target: Target, outputs: Any) -> tuple[Any, tuple[int, int], tuple[int, int]] | None:
        """Where ``target``'s score is read from the head, for support grouping (``camframe.engine.support``):
        ``(key, (h, w), (y, x))``, a cell of a grid, the targets of one key alike up to translation (a
        pyramid level and head branch, say). None (the default): unless ``footprint`` bounds it, its support is
        unbounded and it is never grouped."""
        return None

    def at_cell(self, target: Target, cell: tuple[int, int], outputs: Any) -> Target:
        """``target`` read at ``cell`` of its ``anchor`` grid instead (in ``outputs``); needed where
        ``anchor`` gives cells."""
        raise NotImplementedError

    def footprint(self, target: Target, outputs: Any, shapes: Mapping[str, tuple[int, int]]
                  ) -> dict[str, Rect | None] | None:
        """``target``'s support window by arithmetic, for support grouping, where the head reads a fixed
        region of the explained layers (an RoI): per layer of ``shapes`` (name: its map's ``(h, w)``), the
        rectangle of that map its score can reach (``Rect``), or None where it reaches none of it. It must
        hold for every input: None (the default) where it cannot be bounded so; ``anchor`` is tried then."""
        return None

    def feature_map(self, layer: str, tensor: Tensor) -> Tensor:
        """``tensor``, the output of ``layer`` (its dotted name) or the gradient at it, as a
        ``(B, C, h, w)`` feature map; e.g. a transformer's ``(B, tokens, C)`` without its class
        token, reshaped to the patch grid. Default: ``tensor`` unchanged."""
        return tensor

    def class_names(self, model: nn.Module) -> list[str] | None:
        """Names of the model's classes, or None if unknown."""
        return None

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module) -> tuple[Tensor | list[Tensor], list[dict]]:
        """A batch tensor from RGB uint8 images, and per-image geometry (with ``size``). Where the images'
        inputs differ in size, a list of per-image ``(C, H, W)`` tensors instead (``batch`` makes either):
        the Explainer runs each group of one size as a batch of its own."""
        raise NotImplementedError

    @staticmethod
    def batch(tensors: Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Per-image ``(C, H, W)`` tensors as one batch, or as a list where their sizes differ."""
        return ragged.batch(tensors)

    def preprocessor(self, model: nn.Module
                     ) -> Callable[[Sequence[np.ndarray]], tuple[Tensor | list[Tensor], list[dict]]]:
        """``preprocess`` as a function of the images alone, run in the streaming pipeline's worker
        processes: it must give CPU tensors and touch no GPU. Default: ``preprocess`` with ``model``
        bound. Override it where ``preprocess`` reads the model's device or GPU buffers (bind what it
        needs, computed here), or to keep the model out of what a spawned worker is sent."""
        return functools.partial(self.preprocess, model=model)

    def to_original(self, maps: Tensor, meta: dict) -> Tensor:
        """Maps ``(U, h, w)`` at input resolution -> ``(U, H, W)`` over the original image."""
        return upsample(maps, meta["size"])

    def detect(self, outputs: Any, metas: list[dict], model: nn.Module) -> list[list[Detection]] | None:
        """Detections per image (detectors), or None (classifiers)."""
        return None

    def targets(self, outputs: Any, detections: list[list[Detection]] | None, classes: list[int] | None,
                boxes: Any, model: nn.Module) -> list[Target]:
        """The targets to explain: default classes when ``classes`` is None; ``boxes`` is the
        ``Boxes`` a detector picks (None for classifiers)."""
        raise NotImplementedError

    def score(self, outputs: Any, targets: list[Target]) -> Tensor:
        """One differentiable score per target, shape ``(len(targets),)``."""
        raise NotImplementedError

    def example_input(self, model: nn.Module) -> Tensor:
        """A dummy input batch for probing layer shapes."""
        return torch.zeros(1, 3, 224, 224)

    def score_kind(self, target: Target) -> str:
        """What ``target``'s score is (``logit``, ``probability``...): ``target_score_kind`` by default;
        an adapter whose pseudo-classes score something else says so per target."""
        return self.target_score_kind

    def supported(self, target: Target) -> bool | None:
        """Whether the model backs ``target`` (None: no rule says). Default: a ``logit`` or
        ``probability`` target is supported when its score is above 0 or 0.5; other kinds: None."""
        if target.score != target.score:  # NaN: never scored
            return None
        kind = self.score_kind(target)
        return target.score > 0 if kind == "logit" else target.score > 0.5 if kind == "probability" else None

    def rescore(self, outputs: Any, metas: list[dict], model: nn.Module, targets: list[Target]) -> Tensor:
        """Per row of a (perturbed) batch, the model's confidence in ``targets[row]`` (for
        deletion/insertion; detectors: ``DetectorAdapter.rescore``)."""
        raise NotImplementedError

    def resolve_classes(self, classes: Sequence[int | str], model: nn.Module) -> list[int]:
        """Class ids from ids or names; unknown ones raise a ``CamframeError``."""
        names = self.class_names(model)
        ids: list[int] = []
        for c in classes:
            c = _validate.class_item(c)
            if isinstance(c, str) and c.strip().lstrip("-").isdigit():
                c = int(c)
            if isinstance(c, int):
                if c < 0 or (names is not None and c >= len(names)):
                    raise CamframeError(f"class id {c} out of range" + (f" (0..{len(names) - 1})" if names else ""))
                ids.append(c)
                continue
            lookup = {n.lower(): i for i, n in enumerate(names or [])}
            if c.lower() not in lookup:
                close = difflib.get_close_matches(c.lower(), list(lookup), n=3)
                listing = f"did you mean {', '.join(close)}?" if close else _listing(names)
                raise CamframeError(f"unknown class {c!r}; {listing}")
            ids.append(lookup[c.lower()])
        return ids


def _listing(names: list[str] | None) -> str:
    if not names:
        return "this model has no class names; use class ids"
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return f"the model's classes are: {shown}"


class ClassifierAdapter(Adapter):
    """Models returning ``(B, classes)`` logits: the target is one class's logit per image.

    Images are resized to ``size`` x ``size`` (the whole image is explained) and normalised with
    ``mean``/``std``. Default layer: the last spatial 4-D feature map found by probing.
    """

    name = "classifier"
    aggregate = "avg"

    def __init__(self, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, categories: list[str] | None = None) -> None:
        self.size, self.mean, self.std, self.categories = size, tuple(mean), tuple(std), categories

    def layers(self, model: nn.Module) -> list[str]:
        shapes = probe(model, self.example_input(model))
        four_d = [name for name, shape in shapes.items() if name and len(shape) == 4 and shape[2] * shape[3] > 1]
        if not four_d:
            raise CamframeError("found no 4-D feature map to explain; name the layers")
        return four_d[-1:]

    def class_names(self, model: nn.Module) -> list[str] | None:
        return self.categories

    def preprocess(self, images: Sequence[np.ndarray], model: nn.Module | None) -> tuple[Tensor, list[dict]]:
        batch = np.stack([cv2.resize(im, (self.size, self.size), interpolation=cv2.INTER_AREA
                                     if min(im.shape[:2]) > self.size else cv2.INTER_LINEAR) for im in images])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255)
        x = (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
        return x, [{"size": im.shape[:2]} for im in images]

    def preprocessor(self, model: nn.Module) -> Callable[[Sequence[np.ndarray]], tuple[Tensor, list[dict]]]:
        """This class's ``preprocess`` needs no model: none is bound (a subclass's own ``preprocess`` gets it)."""
        if type(self).preprocess is ClassifierAdapter.preprocess:
            return functools.partial(self.preprocess, model=None)
        return super().preprocessor(model)

    def example_input(self, model: nn.Module) -> Tensor:
        return torch.zeros(1, 3, self.size, self.size)

    @staticmethod
    def logits(outputs: Any) -> Tensor:
        tensor, _ = _first_tensor(outputs)
        if tensor is None or tensor.ndim != 2:
            shape = None if tensor is None else tuple(tensor.shape)
            raise CamframeError(f"expected (batch, classes) logits from the model, got {shape}")
        return tensor

    def targets(self, outputs: Any, detections: Any, classes: list[int] | None, boxes: Any,
                model: nn.Module) -> list[Target]:
        logits = self.logits(outputs)
        names = self.class_names(model)
        picked = [[int(i)] for i in logits.argmax(1)] if classes is None else [classes] * len(logits)
        return [Target(b, c, names[c] if names else str(c)) for b, cs in enumerate(picked) for c in cs]

    def rescore(self, outputs: Any, metas: list[dict], model: nn.Module, targets: list[Target]) -> Tensor:
        """The class probability of each row's target."""
        probs = self.logits(outputs).softmax(1)
        return probs[torch.arange(len(targets)), torch.tensor([t.class_id for t in targets])]

    def score(self, outputs: Any, targets: list[Target]) -> Tensor:
        logits = self.logits(outputs)
        images = torch.tensor([t.image for t in targets], device=logits.device)
        ids = torch.tensor([t.class_id for t in targets], device=logits.device)
        if int(ids.max()) >= logits.shape[1]:
            raise CamframeError(f"class id {int(ids.max())} out of range (model has {logits.shape[1]} classes)")
        return logits[images, ids]


def probe(model: nn.Module, example: Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape of every submodule on ``example``, in the order the modules finish.

    Args:
        model: the model (left as it came: the forward pass runs under ``explaining``, without gradients).
        example: an input batch, such as ``adapter.example_input(model)``.

    Returns:
        ``{module name: output shape}``; the model itself is ``""``.
    """
    from camframe.adapters.state import explaining

    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            tensor, _ = _first_tensor(output)
            if tensor is not None and name not in shapes:
                shapes[name] = tuple(tensor.shape)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with explaining(model), torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(example.to(device))
    finally:
        for h in handles:
            h.remove()
    return shapes
