"""The Explainer: one forward pass, batched gradients per target, maps per layer, aggregation."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from camframe.methods import weightings as _methods
from camframe.plugins import manager as _plugins
from camframe.core import validate as _validate
from camframe.core import ragged
from camframe.adapters.base import Adapter, Detection, Target
from camframe.core.aggregate import AGGREGATES, NORMALISATIONS
from camframe.core.aggregate import aggregate as combine
from camframe.core.aggregate import fold_max, minmax
from camframe.core.capture import Capture, grad, resolve_layers
from camframe.core.profile import Profile
from camframe.adapters.detector import select_boxes
from camframe.core.errors import SMALLER, CamframeError, out_of_memory
from camframe.methods.eigen import eigen
from camframe.methods.guided import Switch
from camframe.methods.guided import guided as guided_mode
from camframe.core.images import load_image
from camframe.engine import outcomes as _outcomes
from camframe.engine.smooth import Smooth, smooth_maps
from camframe.engine.smooth import _arrays as _smooth_arrays
from camframe.engine.smooth import check as check_smooth
from camframe.adapters.state import explaining, refuse_inference_tensors
from camframe.engine.support import Support, color, masks

__all__ = ["Explainer", "Prepared", "Result"]

ScoreFn = Callable[[Any, list[Target]], Tensor]


class Prepared(NamedTuple):
    """A batch the adapter's ``preprocess`` (or ``preprocessor``) already made: ``(x, metas)``."""

    x: Tensor | list[Tensor]  # a batch, or per-image tensors where their sizes differ (``Adapter.preprocess``)
    metas: list[dict]
    images: list[Any] | None = None  # the RGB arrays it was made from (what ``smooth="tta"`` augments)


@dataclass
class Result:
    """Explanations of one batch; one row per target in every tensor.

    ``original(...)`` maps any of the tensors below back onto the original images. Where the images'
    inputs differ in size (the adapter's ``preprocess`` gave per-image tensors), ``sizes`` holds each
    image's own ``(H, W)`` and every tensor is zero-padded at the bottom and right to the largest.

    Attributes:
        targets: the explained targets, one per row (image index, class, box, score).
        maps: ``(U, H, W)`` aggregated maps in [0, 1] at the model's input resolution (layers put on
            one scale by ``normalise``).
        layer_maps: the raw (unnormalised, non-negative) map of each layer at its own resolution.
        reached: per layer, whether each target's gradient reached it.
        detections: a detector's detections per image; None for a classifier.
        metas: the adapter's per-image geometry (for ``original``).
        method: the weighting method's name.
        aggregate: how the layers' maps were combined.
        guided: the guided-backprop gradients ``(U, C, H, W)``, when asked for.
        guided_gradcam: ``guided`` times ``maps``, when asked for.
        inputs: the preprocessed batch.
        adapter: the adapter that explained it.
        normalise: how layers were put on one scale (``common`` or ``layer``).
        smooth: the smoothing (``Explainer(smooth=...)``), if any.
        views: with tta or noise, how many views each target's map averages.
        sizes: each image's input ``(H, W)`` where they differ, else None.
    """

    targets: list[Target]
    maps: Tensor
    layer_maps: dict[str, Tensor]
    reached: dict[str, Tensor]
    detections: list[list[Detection]] | None
    metas: list[dict]
    method: str
    aggregate: str
    guided: Tensor | None = None
    guided_gradcam: Tensor | None = None
    inputs: Tensor | None = field(default=None, repr=False)
    adapter: Adapter | None = field(default=None, repr=False)
    normalise: str = "common"
    smooth: str | None = None  # the smoothing (``Explainer(smooth=...)``), if any
    views: list[int] | None = None  # with tta or noise: how many views each target's map averages
    sizes: list[tuple[int, int]] | None = None  # each image's input (H, W) where they differ, else None
    outcomes: list[dict[str, Any]] | None = None  # with labels or regions: each image's (``_outcomes.plan``)

    def original(self, tensor: Tensor | None = None, rows: Sequence[int] | None = None) -> list[Tensor]:
        """Rows of a tensor mapped onto each target's original image.

        Args:
            tensor: one row per target in ``rows``; default ``maps``.
            rows: the targets of ``tensor``'s rows; default all.

        Returns:
            One tensor per row, at its image's original size.
        """
        tensor = self.maps if tensor is None else tensor
        rows = range(len(self.targets)) if rows is None else rows
        out = []
        for u, row in zip(rows, tensor):
            image = self.targets[u].image
            meta = self.metas[image]
            if self.sizes is not None:  # the image's own input, without the padding
                row = row[..., :self.sizes[image][0], :self.sizes[image][1]]
            if self.adapter is None or "size" not in meta:
                out.append(row)
            else:
                out.append(self.adapter.to_original(row[None], meta)[0])
        return out

    def overview(self, image: int, classes: Sequence[int | str] | None = None) -> Tensor | None:
        """An image's overview map: the per-pixel max of its targets' maps (each in [0, 1], so every
        box shows at full strength).

        Args:
            image: the image's index in the batch.
            classes: only the targets whose class id or name is in it; default all.

        Returns:
            The map on the original image, or None when the image has no such target.
        """
        stack = None
        for u, t in enumerate(self.targets):
            if t.image == image and (classes is None or t.class_id in classes or t.class_name in classes):
                stack = fold_max(stack, self.original(self.maps[u][None], [u])[0].clamp(0, 1))
        return stack

    def detached(self) -> "Result":
        """Detach from autograd.

        Returns:
            This result with every tensor in it detached (what ``Explainer`` returns).
        """
        return replace(self, **{f.name: _detached(getattr(self, f.name)) for f in fields(self)})


def _float32(value: Any) -> Any:
    """``value`` with every floating tensor in it, also inside tuples, lists and dicts, in float32."""
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_float32(v) for v in value)
    return value


def _detached(value: Any) -> Any:
    """``value`` with every tensor in it, also inside dicts and lists, detached."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_detached(v) for v in value]
    return value


class Explainer:
    """Explain a model's targets with class activation maps.

    ```python
    with Explainer(model, layers=["layer4"]) as ex:
        result = ex(images, target="tabby")
    ```

    Inside ``with`` the model is in eval mode with frozen parameters and hooks attached; on exit
    (also on error) it is returned exactly as it came. Called outside ``with``, each call does the
    same by itself.

    Args:
        model: the model to explain (an ``nn.Module`` or what an adapter accepts).
        layers: layer names, modules or an adapter's preset name; default the adapter's.
        method: the weighting method (``gradcam``, ``hirescam``, ``eigencam``, ``drise``...); default the adapter's.
        aggregate: how the layers' maps are combined; default the adapter's.
        adapter: the adapter, or its name; default the first plugin that claims the model.
        guided: also compute guided backprop (``Result.guided``, ``guided_gradcam``).
        allow_unreached: allow layers the target's gradient does not reach (their maps are zero).
        grad_batch: targets per backward pass.
        options: go to the adapter (e.g. a detector's ``conf``).
        normalise: ``"common"`` (layers compared as densities per input pixel) or ``"layer"`` (each
            min-max normalised first, as pytorch-grad-cam); default the adapter's.
        half: run the forward passes under autocast on a GPU (bfloat16 where it has it, else float16;
            the maps are computed in float32); on the CPU it is refused.
        method_options: go to a black-box method (``method="drise"``: ``masks``, ``seed``,
            ``mask_batch``, ``grid``, ``keep``), which takes no layers and no gradients.
        smooth: ``"tta"``, ``"eigen"`` or ``"noise:N[:SIGMA[:SEED]]"`` (see ``camframe.engine.smooth``,
            docs/smoothing.md).
        group: sum the targets of an image whose gradients cannot meet at any explained layer in one
            backward pass (``camframe.engine.support``; where the adapter bounds its targets), with the same
            maps; ``groups`` then holds the last call's number of targets, of backward passes, and
            ``at least``: the passes no exact grouping by these windows could go below (targets that all meet).
        profile: time the stages of every call (``profile``, a ``camframe.core.profile.Profile``: wall
            seconds of the forward, the support windows, the backward passes, the maps...; on a GPU
            each stage waits for the device).
    """

    def __init__(self, model: Any, layers: Sequence[str | nn.Module] | str | None = None,
                 method: str | None = None, aggregate: str | None = None,
                 adapter: str | Adapter | None = None, guided: bool | None = None,
                 allow_unreached: bool | None = None, grad_batch: int = 1,
                 options: dict[str, Any] | None = None, normalise: str | None = None, half: bool = False,
                 method_options: dict[str, Any] | None = None, smooth: str | Smooth | None = None,
                 group: bool = True, profile: bool = False) -> None:
        self.adapter = copy.copy(_plugins.resolve_adapter(model, adapter))
        self.adapter.configure(**(options or {}))
        with torch.inference_mode(False):  # a private copy made here must hold normal tensors
            self.model = self.adapter.prepare(model)
        if not isinstance(self.model, nn.Module):
            raise CamframeError(f"adapter {self.adapter.name!r} gave no torch module to explain")
        refuse_inference_tensors(self.model)  # before anything touches it
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        presets = self.adapter.layer_presets(self.model)
        wanted = [n for layer in layers or [] for n in
                  (presets[layer] if isinstance(layer, str) and layer in presets else [layer])]
        self.method_name, self.method = _plugins.resolve_method(method or self.adapter.method)
        self.method_options = _methods.method_options(self.method, self.method_name, self.adapter, method_options)
        self.black_box = bool(getattr(self.method, "black_box", False))  # no layers, no gradients
        if self.black_box and wanted:
            raise CamframeError(f"method {self.method_name!r} runs the model as a black box: it takes no layers")
        self.layers = {} if self.black_box else resolve_layers(self.model, wanted or self.adapter.layers(self.model))
        self.smooth = Smooth.parse(smooth)
        if self.smooth is not None and self.black_box:
            raise CamframeError(f"method {self.method_name!r} runs the model as a black box: --smooth does not apply")
        if self.smooth is not None and self.smooth.kind == "eigen":
            self.method = eigen(self.method)
        self.aggregate = aggregate or self.adapter.aggregate
        if self.aggregate not in AGGREGATES:
            raise CamframeError(f"unknown aggregate {self.aggregate!r}; choose one of {', '.join(AGGREGATES)}")
        self.normalise = normalise or self.adapter.normalise
        if self.normalise not in NORMALISATIONS:
            raise CamframeError(f"unknown normalisation {self.normalise!r}; choose {' or '.join(NORMALISATIONS)}")
        if self.black_box and guided:
            raise CamframeError(f"method {self.method_name!r} uses no gradients: guided backprop does not apply")
        self.guided = self.adapter.guided if guided is None else guided
        self.guided = self.guided and not self.black_box
        self.allow_unreached = self.adapter.allow_unreached if allow_unreached is None else allow_unreached
        self.grad_batch = max(1, grad_batch)
        self.half = _half_dtype(self.device) if half else None
        self._capture: Capture | None = None
        self._state: Any = None
        self._depth = 0
        self._input: tuple[int, ...] | None = None  # the last model input's shape, named if memory runs out
        self._support = Support(self.model, self.adapter) if group else None
        self._shape: tuple[int, ...] = ()  # the last forward's input shape (the support probe's)
        self.groups = {"targets": 0, "backward passes": 0, "at least": 0}
        self.profile = Profile(self.device, profile)

    def __enter__(self) -> "Explainer":
        self._depth += 1
        if self._depth > 1:  # already inside ``with``: nothing more to set up
            return self
        self._state = explaining(self.model)
        self._state.__enter__()
        try:
            self._capture = Capture(self.layers).__enter__()
        except BaseException:
            self._depth = 0
            self._state.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        try:
            if self._capture is not None:
                self._capture.__exit__()
        finally:
            self._capture = None
            self._state.__exit__(*exc)

    def __call__(self, images: Any, target: Any = None, boxes: Any = None, labels: Any = None, regions: Any = None,
                 contrast: int | str | None = None, match_iou: float = 0.5) -> Result:
        """Explain a batch of images.

        Args:
            images: file paths, RGB uint8 arrays, an already preprocessed ``(B, C, H, W)`` tensor, or
                a ``Prepared`` batch.
            target: None (the adapter's default: top-1 class, or each box's class), class ids or names,
                or a callable from the model's outputs to one score per image.
            boxes: a detector's boxes: ``"all"`` (the default), ``"top:K"``, indices or a ``Boxes``;
                refused for a classifier.
            labels: a detector's ground truth (docs/explaining-errors.md), per image a ``Truth`` or
                ``(box, class)`` pairs (xyxy, original pixels): each detection is marked ``tp`` or ``fp``
                (IoU >= ``match_iou``) and each missed object explained through the model's best candidate.
            regions: per image ``(box, class or None)`` pairs: the best candidate for any box is explained.
            contrast: a class: each target's class minus it is explained.
            match_iou: the IoU at which a detection matches a ground-truth object.

        Returns:
            The ``Result``, one row per target, detached from autograd; ``Result.outcomes`` says which
            target is a detection, a missed object, a user's box or a confusion.
        """
        if self._capture is None:
            with self:
                return self(images, target, boxes, labels, regions, contrast, match_iou)
        self._input = None
        errors = _outcomes.Errors.of(self.adapter, self.model, labels, regions, contrast, match_iou, self.black_box)
        self.groups = {"targets": 0, "backward passes": 0, "at least": 0}
        with torch.inference_mode(False), torch.enable_grad():
            try:
                return self._explain(images, target, boxes, errors).detached()  # no autograd history leaves
            except Exception as exc:
                why = out_of_memory(exc)
                if why is None:
                    raise
                size = "x".join(map(str, self._input)) if self._input else "the input"
                raise CamframeError(f"out of memory explaining a model input of {size} ({why}); {SMALLER}") from None
            finally:
                self._capture.reset()  # the forward's graph must not outlive the call

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (the CPU for a model without any)."""
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def preprocess(self, images: Any) -> tuple[Tensor | list[Tensor], list[dict]]:
        """Preprocess images as the adapter does.

        Args:
            images: paths, arrays, a ready tensor or a ``Prepared`` batch.

        Returns:
            The batch tensor (per-image tensors where the adapter sizes the images' inputs differently)
            and each image's geometry.
        """
        if isinstance(images, Prepared):
            x = images.x
            return (ragged.batch(x) if isinstance(x, (list, tuple)) else x), list(images.metas)
        if isinstance(images, Tensor):
            channels = _validate.input_channels(self.model, self.adapter)
            return _validate.tensor_batch(images, channels), [{} for _ in images]
        arrays = [im if isinstance(im, np.ndarray) else load_image(im) for im in _validate.image_list(images)]
        x, metas = self.adapter.preprocess([_validate.rgb_array(a) for a in arrays], self.model)
        return (ragged.batch(x) if isinstance(x, (list, tuple)) else x), metas

    def record(self, x: Tensor) -> Any:
        """The model's outputs on (a copy of) the input batch ``x``, its layers' activations recorded for
        ``recorded_maps``. Engine-internal, for passes beyond the first (``camframe.engine.smooth``'s views);
        only inside ``with``."""
        assert self._capture is not None, "Explainer.record runs inside `with Explainer(...)`"
        with self._capture.recording():
            return self._forward(x.clone())

    def recorded_maps(self, score_fn: ScoreFn, outputs: Any, targets: list[Target], size: tuple[int, ...]) -> Tensor:
        """The aggregated maps ``(U, *size)`` of ``targets`` (their scores set on them) from the last ``record``'s
        ``outputs`` and activations; ``score_fn`` scores them. Engine-internal, as ``record``."""
        assert self._capture is not None, "Explainer.recorded_maps runs inside `with Explainer(...)`"
        return self._maps(self._capture.activations, score_fn, outputs, targets, size)[2]

    def _explain(self, images: Any, target: Any, boxes: Any, errors: _outcomes.Errors | None = None) -> Result:
        if target is not None and not callable(target):  # checked before the model runs
            target = _validate.class_ids(target, self.adapter, self.model)
        boxes = select_boxes(self.adapter, boxes)
        check_smooth(self.smooth, images)
        with self.profile.stage("preprocess"):
            x, metas = self.preprocess(images)
        if isinstance(x, Tensor):
            return self._explain_batch(x, metas, images, target, boxes, errors)
        # inputs of different sizes: each group of one size is a batch of its own
        sources = _smooth_arrays(images)
        parts = []
        for idx, group in ragged.groups(x):
            own = Prepared(group, [metas[i] for i in idx], None if sources is None else [sources[i] for i in idx])
            part = self._explain_batch(group, own.metas, own, target, boxes, errors and errors.subset(idx))
            parts.append((idx, part.detached()))
            self._capture.reset()  # type: ignore[union-attr]
        return ragged.merge(parts, metas)

    def _explain_batch(self, x: Tensor, metas: list[dict], images: Any, target: Any, boxes: Any,
                       errors: _outcomes.Errors | None = None) -> Result:
        """Explain one batch ``x`` (of ``images``, for smoothing) with resolved ``target`` and ``boxes``."""
        self._input = tuple(x.shape)
        x = x.to(self.device, non_blocking=True).clone()
        if self.black_box:
            with torch.no_grad(), self.profile.stage(f"{self.method_name} (black box)"):
                return self._black_box(x, metas, target, boxes)
        assert self._capture is not None
        # with guided backprop, one forward serves both: the maps' backward passes have the guided
        # rule switched off (true gradients), the input's have it on
        xg = x.detach().requires_grad_() if self.guided else x
        guiding = guided_mode(self.model, _plugins.guided_rules(), Switch(on=False)) if self.guided else nullcontext()
        with self.profile.stage("forward and detections"):
            with self._capture.recording(), guiding as switch:  # only this forward records; not the user's own
                outputs = self._forward(xg.clone())  # the model may change its input in place; keep x as it was
            detections = self.adapter.detect(outputs, metas, self.model)
            score_fn, targets = self._targets(outputs, detections, target, boxes, len(x))
            outcomes = None
            if errors is not None:
                score_fn, targets, outcomes = errors.apply(self.adapter, outputs, metas, self.model, detections,
                                                           score_fn, targets)
        size = tuple(x.shape[-2:])
        if not targets:
            return Result([], x.new_zeros(0, *size), {}, {}, detections, metas, self.method_name,
                          self.aggregate, inputs=x, adapter=self.adapter, normalise=self.normalise,
                          outcomes=outcomes)
        acts = self._capture.activations  # read only now: with no target, a layer may not have run
        layer_maps, reached, maps = self._maps(acts, score_fn, outputs, targets, size, keep_graph=self.guided)
        result = Result(targets, maps, layer_maps, reached, detections, metas, self.method_name,
                        self.aggregate, inputs=x, adapter=self.adapter, normalise=self.normalise, outcomes=outcomes)
        if self.guided:
            switch.on = True
            with self.profile.stage("guided backprop"):
                result.guided = self._guided(xg, outputs, targets, score_fn)
                result.guided_gradcam = result.guided * maps[:, None]
        del outputs, acts
        if self.smooth is not None:
            result.smooth = str(self.smooth)
            if self.smooth.kind != "eigen":
                with self.profile.stage("smoothing"):
                    smooth_maps(self, images, x, result, score_fn)
        return result

    def _maps(self, acts: dict[str, Tensor], score_fn: ScoreFn, outputs: Any, targets: list[Target],
              size: tuple[int, ...], keep_graph: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Layer maps, reached flags and aggregated maps of ``targets`` (their scores set on them)."""
        with self.profile.stage("maps"):
            layer_maps, reached = self._layer_maps(acts, score_fn, outputs, targets, keep_graph)
            return layer_maps, reached, combine(layer_maps, reached, size, self.aggregate, self.normalise)

    def _black_box(self, x: Tensor, metas: list[dict], target: Any, boxes: Any) -> Result:
        """A black-box method (``drise``) on the adapter's targets: one map per target at input
        resolution (``layer_maps["input"]``: no layer is involved), min-max normalised."""
        if callable(target):
            raise CamframeError(f"method {self.method_name!r} explains the adapter's targets, not a callable")
        outputs = self._forward(x.clone())
        detections = self.adapter.detect(outputs, metas, self.model)
        targets = self.adapter.targets(outputs, detections, target, boxes, self.model)
        raw = x.new_zeros(0, *x.shape[-2:])
        if targets:
            for t, s in zip(targets, self.adapter.score(outputs, targets).tolist()):
                t.score = s
            raw = self.method(self.model, self.adapter, x, metas, targets, **self.method_options).clamp(min=0)
        reached = {"input": torch.ones(len(targets), dtype=torch.bool, device=x.device)}
        return Result(targets, minmax(raw), {"input": raw}, reached, detections, metas, self.method_name,
                      self.aggregate, inputs=x, adapter=self.adapter, normalise=self.normalise)

    def _targets(self, outputs: Any, detections: Any, target: Any, boxes: Any, batch: int
                 ) -> tuple[ScoreFn, list[Target]]:
        """Score function and targets: ``target`` is a callable, resolved class ids, or None."""
        if callable(target):
            _validate.scores(target(outputs), batch)
            return (lambda out, ts: _validate.scores(target(out), batch)[[t.image for t in ts]],
                    [Target(b, None, getattr(target, "__name__", "custom")) for b in range(batch)])
        return self.adapter.score, self.adapter.targets(outputs, detections, target, boxes, self.model)

    def _rounds(self, targets: list[Target]) -> list[list[int]]:
        """Groups of target indices with at most one target per image (summed in one backward)."""
        return color([t.image for t in targets], [None] * len(targets))[0]

    def _windows(self, acts: dict[str, Tensor], score_fn: ScoreFn, outputs: Any, targets: list[Target]) -> list:
        """Each target's support window per layer (None: unbounded), for grouping; all None without it."""
        if self._support is None or not self._shape:
            return [None] * len(targets)
        def layer_shapes() -> dict[str, tuple[int, ...]]:
            return {n: tuple(self._feature_map(n, a.detach()).shape[-2:]) for n, a in acts.items()}

        shape = (1, *self._shape[1:])

        def probe() -> tuple[Any, dict[str, Tensor]]:
            assert self._capture is not None
            with self._capture.recording():
                out = self.model(torch.ones(shape, device=self.device))
            return out, self._capture.activations

        try:
            return self._support.windows(targets, outputs, layer_shapes, probe, score_fn)
        finally:
            self._capture.reset()  # type: ignore[union-attr]

    def _gradients(self, score_fn: ScoreFn, outputs: Any, inputs: list[Tensor], targets: list[Target],
                   keep_graph: bool = False, rounds: list[list[int]] | None = None, per_image: bool = False
                   ) -> Iterator[tuple[list[int], Tensor, list[Tensor]]]:
        """Yield ``(indices, scores, per-input gradients on those targets' own images)`` per round
        (``rounds``: default, one target per image in each; a round's targets of one image are summed;
        ``per_image``, with ``grad_batch`` 1: the gradients per image of the batch instead).

        Each round scores only its own targets, so the backward covers only the part of the graph
        they depend on (an adapter can keep other pyramid levels out of it). With ``grad_batch`` > 1,
        that many rounds share one vectorised backward (``is_grads_batched``); otherwise there is
        one ``autograd.grad`` per round, the graph retained until the last (or kept: ``keep_graph``).
        """
        rounds = self._rounds(targets) if rounds is None else rounds
        images = torch.tensor([t.image for t in targets], device=self.device)
        for start in range(0, len(rounds), self.grad_batch):
            chunk = rounds[start:start + self.grad_batch]
            members = [i for c in chunk for i in c]
            scores = score_fn(outputs, [targets[i] for i in members]).reshape(-1)
            own = images[torch.tensor(members, device=self.device)]
            if not scores.requires_grad:  # no target layer on the way to these scores
                yield members, scores, [inp.new_zeros(len(members), *inp.shape[1:]) for inp in inputs]
                continue
            last = start + len(chunk) >= len(rounds) and not keep_graph
            if len(chunk) == 1:
                with self.profile.stage("backward passes"):
                    grads = grad(scores.sum(), inputs, retain_graph=not last)
                whole = [targets[i].image for i in members] == list(range(len(inputs[0])))
                yield members, scores.detach(), [g if whole or per_image else g[own] for g in grads]  # no copies
                continue
            rows = torch.tensor([r for r, c in enumerate(chunk) for _ in c], device=self.device)
            weights = torch.nn.functional.one_hot(rows, len(chunk)).T.to(scores.dtype)
            with self.profile.stage("backward passes"):
                grads = grad(scores, inputs, weights, retain_graph=not last, is_grads_batched=True)
            # an input no score reaches comes back unbatched (zeros of its own shape)
            grads = [g if g.dim() > inp.dim() else g.expand(len(chunk), *g.shape) for g, inp in zip(grads, inputs)]
            yield members, scores.detach(), [g[rows, own] for g in grads]

    def _layer_maps(self, acts: dict[str, Tensor], score_fn: ScoreFn, outputs: Any, targets: list[Target],
                    keep_graph: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        feats = {n: self._feature_map(n, a.detach().float()) for n, a in acts.items()}  # maps in float32
        for name, f in feats.items():
            if f.ndim != 4:
                raise CamframeError(f"layer {name!r} gives shape {tuple(f.shape)}, not a (B, C, H, W) feature map; "
                                    "choose another layer, or have the adapter's feature_map reshape it")
        images = torch.tensor([t.image for t in targets], device=self.device)
        names = list(acts)
        batch = len(next(iter(feats.values())))
        if not getattr(self.method, "needs_gradients", True):
            for t, s in zip(targets, score_fn(outputs, targets).detach().cpu().tolist()):
                t.score = s
            maps = {n: self.method(feats[n][images], None).clamp(min=0) for n in names}
            return maps, {n: torch.ones(len(targets), dtype=torch.bool, device=self.device) for n in names}
        maps = {n: feats[n].new_zeros(len(targets), *feats[n].shape[-2:]) for n in names}
        highs = {n: feats[n].new_zeros(len(targets)) for n in names}  # each target's largest and smallest
        lows = {n: feats[n].new_zeros(len(targets)) for n in names}  # gradient: reached if either is not 0
        found = torch.full((len(targets),), float("nan"), dtype=torch.float64, device=self.device)
        with self.profile.stage("support windows"):
            windows = self._windows(acts, score_fn, outputs, targets)
            rounds, bound = color([t.image for t in targets], windows)
            # where no round sums two targets of one image, each gradient is its own: nothing to mask
            shared = any(len({targets[i].image for i in r}) < len(r) for r in rounds)
            window = {n: masks(windows, n, tuple(feats[n].shape[-2:]), self.device) if shared else None
                      for n in names}
        self.groups["targets"] += len(targets)
        self.groups["backward passes"] += len(rounds)
        self.groups["at least"] += bound
        self.profile.count("targets", len(targets))
        self.profile.count("backward passes", len(rounds))
        self.profile.count("lower bound on passes", bound)
        # a pixel-local method's map of a target is its group's map inside its window: one map per image
        local = getattr(self.method, "local", False) and self.grad_batch == 1 and shared
        for members, scores, grads in self._gradients(score_fn, outputs, [acts[n] for n in names], targets,
                                                      keep_graph, rounds, per_image=local):
            if local:
                found[members] = scores.to(found.dtype)
                self._local_maps(members, images[members], feats, grads, window, maps, highs)
                continue
            consecutive = members == list(range(members[0], members[-1] + 1))
            idx = slice(members[0], members[-1] + 1) if consecutive else torch.tensor(members, device=self.device)
            found[idx] = scores.to(found.dtype)
            whole = [targets[i].image for i in members] == list(range(batch))  # each image once, in order
            for n, g in zip(names, grads):
                a = feats[n] if whole else feats[n][images[idx]]
                g = self._feature_map(n, g.float())
                if window[n] is not None:  # a target's own gradient: its group's, inside its window
                    g = g * window[n][members]
                dims = tuple(range(1, g.dim()))  # g is often a strided slice (of a Concat's gradient): no copies
                with torch.no_grad():  # a method's output may require grad (test_contract); maps never do
                    if consecutive:  # written in place, straight where they belong
                        torch.clamp(self.method(a, g), min=0, out=maps[n][idx])
                        torch.amax(g, dims, out=highs[n][idx])
                        torch.amin(g, dims, out=lows[n][idx])
                    else:
                        maps[n][idx] = self.method(a, g).clamp(min=0).to(maps[n].dtype)
                        highs[n][idx], lows[n][idx] = g.amax(dims), g.amin(dims)
        for t, s in zip(targets, found.tolist()):  # one device sync for all rounds
            t.score = s
        reached = {n: (highs[n] > 0) | (lows[n] < 0) for n in names}
        if not self.allow_unreached:
            for n, ok in zip(names, torch.stack([reached[n].all() for n in names]).tolist()):
                if not ok:
                    raise CamframeError(f"layer {n!r} receives no gradient from the target; "
                                        f"{_no_gradient_reason(self.model)}")
        return maps, reached

    def _local_maps(self, members: list[int], own: Tensor, feats: dict[str, Tensor], grads: list[Tensor],
                    window: dict[str, Tensor | None], maps: dict[str, Tensor], highs: dict[str, Tensor]) -> None:
        """Maps and reached flags (in ``highs``) of ``members`` of one round, on images ``own``, from the
        round's per-image gradients: the method run once per image, each target's map masked to its window."""
        for n, g in zip(feats, grads):
            g = self._feature_map(n, g.float())
            with torch.no_grad():
                per = self.method(feats[n], g).clamp(min=0)
                nonzero = (g != 0).any(1)
                inside = window[n][members, 0] if window[n] is not None else torch.ones_like(nonzero[own])
                maps[n][members] = (per[own] * inside).to(maps[n].dtype)
                highs[n][members] = (nonzero[own] & inside).flatten(1).any(1).to(highs[n].dtype)

    def _forward(self, x: Tensor) -> Any:
        """The model's outputs on ``x``; with ``half``, run under autocast and their floating tensors (in
        tuples, lists and dicts) cast back to float32, so detection, NMS and scores work in float32."""
        self._shape = tuple(x.shape)
        if self.half is None:
            return self.model(x)
        with torch.autocast(self.device.type, dtype=self.half):
            return _float32(self.model(x))

    def _feature_map(self, name: str, tensor: Tensor) -> Tensor:
        """The adapter's ``(B, C, h, w)`` view of a captured output or gradient; a module called
        several times (``name#i``) is passed by its own name."""
        module, sep, call = name.rpartition("#")
        return self.adapter.feature_map(module if sep and call.isdigit() else name, tensor)

    def _guided(self, xg: Tensor, outputs: Any, targets: list[Target], score_fn: ScoreFn) -> Tensor:
        """Guided-backprop gradients of ``targets`` w.r.t. the input ``xg`` of the forward that made
        ``outputs`` (run in guided mode, its switch now on)."""
        out = torch.zeros(len(targets), *xg.shape[1:], device=xg.device)
        for members, _, (g,) in self._gradients(score_fn, outputs, [xg], targets):
            out[members] = g
        return out


def _half_dtype(device: torch.device) -> torch.dtype:
    """The autocast type for ``half`` on ``device``: bfloat16 where the GPU has it (the float32 range, so
    gradients do not underflow), else float16; the CPU is refused."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    raise CamframeError(f"half precision (--half) needs a GPU (cuda or mps); the model is on {device.type}")


def _no_gradient_reason(model: nn.Module) -> str:
    """Why a target may not depend on a layer, where the model shows it: a layer whose weights are all
    zero (an untrained model's zero-initialised head) makes the target constant."""
    zero = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and m.weight.numel() and not bool(m.weight.detach().any())]
    if zero:
        return (f"the weights of {', '.join(map(repr, zero))} are all zero (a head zero-initialised, as some "
                "model builders make it, and never trained?): a target read through it does not depend on the "
                "layer; load trained weights")
    return "choose another layer"
