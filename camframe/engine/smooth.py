"""Smoothing of the maps: test-time augmentation (``tta``), the principal component of the weighted
activations (``eigen``, a method wrapper: ``camframe.methods.eigen``) and SmoothGrad (``noise:N[:SIGMA[:SEED]]``).

``tta`` and ``noise`` explain *views* of each image and average their maps; the targets, their
scores and everything else in the ``Result`` stay those of the unaugmented pass. A detector's
target is followed into a view as the detection of its box's class with the highest IoU to its
(transformed) box, IoU > 0.5; a view without one is left out of that target's average
(``Result.views`` counts the views used). ``tta`` augments the *image arrays* (flip, zoom in by a
centre crop, zoom out by a mean-colour border), so each view goes through the adapter's own
preprocessing (letterbox, resize, crop); maps come back through the view's ``to_original`` and
the unaugmented ``to_original`` undone, per axis. ``noise`` perturbs the preprocessed tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from camframe.core import validate as _validate
from camframe.adapters.base import Adapter, Target
from camframe.core.boxes import pair_iou
from camframe.core.aggregate import minmax
from camframe.core.errors import CamframeError
from camframe.core.images import load_image
from camframe.core.ragged import groups

if TYPE_CHECKING:
    from camframe.engine.explainer import Explainer, Result

__all__ = ["Smooth", "smooth_maps", "TTA_SCALES"]

TTA_SCALES = (0.83, 1.0, 1.2)  # content scale of each zoom; each also flipped
_SPEC = "none, tta, eigen or noise:N[:SIGMA[:SEED]]"


@dataclass(frozen=True)
class Smooth:
    """A smoothing: ``kind`` is ``tta``, ``eigen`` or ``noise``; for noise, ``copies`` noisy copies
    with Gaussian noise of ``sigma`` times the input's range (max - min), drawn from ``seed``."""

    kind: str
    copies: int = 0
    sigma: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("tta", "eigen", "noise"):
            raise CamframeError(f"unknown smoothing {self.kind!r}; choose {_SPEC}")
        if self.kind == "noise" and not (isinstance(self.copies, int) and self.copies >= 1 and
                                         math.isfinite(self.sigma) and self.sigma > 0):
            raise CamframeError(f"smoothing noise needs N >= 1 copies and SIGMA > 0, got {self}")

    @classmethod
    def parse(cls, spec: str | Smooth | None) -> Smooth | None:
        """From ``none`` (None), ``tta``, ``eigen``, ``noise:N``, ``noise:N:SIGMA``, ``noise:N:SIGMA:SEED``."""
        if spec is None or isinstance(spec, Smooth):
            return spec
        if not isinstance(spec, str):
            raise CamframeError(f"smooth must be one of {_SPEC}, got {spec!r}")
        kind, *args = spec.strip().split(":")
        if kind in ("", "none") and not args:
            return None
        if kind in ("tta", "eigen") and not args:
            return cls(kind)
        if kind == "noise" and 1 <= len(args) <= 3:
            try:
                copies, sigma, seed = int(args[0]), float(args[1]) if len(args) > 1 else 0.15, \
                    int(args[2]) if len(args) > 2 else 0
            except ValueError:
                copies, sigma, seed = 0, 0.0, 0
            if copies >= 1 and math.isfinite(sigma) and sigma > 0:
                return cls("noise", copies, sigma, seed)
            raise CamframeError(f"smooth {spec!r}: expected noise:N[:SIGMA[:SEED]] with whole N >= 1, SIGMA > 0 "
                                "(a share of the input's range, e.g. 0.15) and a whole SEED")
        raise CamframeError(f"unknown smoothing {spec!r}; choose {_SPEC}")

    def __str__(self) -> str:
        if self.kind != "noise":
            return self.kind
        return f"noise:{self.copies}:{self.sigma:g}" + (f":{self.seed}" if self.seed else "")


def check(smooth: Smooth | None, images: Any) -> None:
    """Refuse what a smoothing cannot take, before the model runs."""
    if smooth is not None and smooth.kind == "tta" and _arrays(images) is None:
        raise CamframeError("smoothing tta augments images: give paths or arrays, not a preprocessed tensor")


def _arrays(images: Any) -> list[Any] | None:
    """The images (paths or arrays) behind ``images``: a ``Prepared`` batch's own, None for a tensor."""
    if isinstance(images, Tensor):
        return None
    if isinstance(images, tuple) and hasattr(images, "metas"):  # a Prepared batch
        return getattr(images, "images", None)
    return _validate.image_list(images)


def smooth_maps(ex: Explainer, images: Any, x: Tensor, result: Result, score_fn: Callable) -> None:
    """Replace ``result.maps`` by the average of the views' maps (``ex.smooth`` is tta or noise) and
    set ``result.views``; the targets, scores, layer maps and detections stay the unaugmented pass's."""
    smooth = ex.smooth
    assert smooth is not None and smooth.kind in ("tta", "noise")
    total = torch.zeros_like(result.maps)
    weight = torch.zeros_like(result.maps)
    views = [0] * len(result.targets)
    if smooth.kind == "tta":
        total += result.maps  # the unaugmented view
        weight += 1
        views = [1] * len(result.targets)
        arrays = [_validate.rgb_array(im if isinstance(im, np.ndarray) else load_image(im))
                  for im in _arrays(images) or []]
        base = [_axes(ex.adapter, meta, x.shape[-2:]) for meta in result.metas]
        for scale in TTA_SCALES:
            for flip in (False, True):
                if scale != 1.0 or flip:
                    _tta_view(ex, arrays, result, score_fn, (scale, flip), base, total, weight, views)
    else:
        for noisy in _noisy(x, smooth):
            maps, rows = _view(ex, noisy, result.metas, result.targets, score_fn, lambda t: t.detection.box)
            total[rows] += maps
            weight[rows] += 1
            for u in rows:
                views[u] += 1
    seen = weight.flatten(1).amax(1) > 0  # a target no noisy copy found keeps its unsmoothed map
    total[seen] = minmax(total[seen] / weight[seen].clamp(min=1e-6))
    result.maps = torch.where(seen[:, None, None], total, result.maps)
    if result.guided is not None:
        result.guided_gradcam = result.guided * result.maps[:, None]
    result.views = views


def _noisy(x: Tensor, smooth: Smooth) -> Iterator[Tensor]:
    """``smooth.copies`` noisy copies of ``x``; each image's noise drawn from its own generator
    seeded with ``smooth.seed``, so it does not depend on the batch it came in."""
    spread = (x.flatten(1).amax(1) - x.flatten(1).amin(1)) * smooth.sigma
    generators = [torch.Generator().manual_seed(smooth.seed) for _ in range(len(x))]
    for _ in range(smooth.copies):
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x)
        yield x + noise * spread[:, None, None, None]


def _view(ex: Explainer, x: Tensor, metas: list[dict], targets: list[Target], score_fn: Callable,
          box: Callable[[Target], Sequence[float] | None]) -> tuple[Tensor, list[int]]:
    """One view's maps (at its input resolution) for the targets found in it, and their rows.
    ``box(t)`` is a detector target's box in the view's original frame (None: not in the view)."""
    outputs = ex.record(x)
    detections = ex.adapter.detect(outputs, metas, ex.model)
    found, rows = [], []
    for u, t in enumerate(targets):
        if t.detection is None:  # a classifier's class, or a callable target: the same in every view
            found.append(replace(t))
            rows.append(u)
            continue
        where = box(t)
        if where is None:
            continue
        same = [(pair_iou(d.box, where), k) for k, d in enumerate(detections[t.image])
                if d.class_id == t.detection.class_id]
        iou, k = max(same, default=(0.0, -1))
        if iou > 0.5:
            found.append(replace(t, box=k, detection=detections[t.image][k]))
            rows.append(u)
    if not found:
        return x.new_zeros(0, *x.shape[-2:]), []
    maps = ex.recorded_maps(score_fn, outputs, found, tuple(x.shape[-2:]))
    return maps, rows


def _zoom(image: np.ndarray, scale: float) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` with its content ``scale`` times as large once resized to a fixed input: a centre
    crop (zoom in) or a mean-colour border (zoom out), the same on both sides (so that zooming and
    flipping commute); and the (dy, dx) from original to view pixels."""
    h, w = image.shape[:2]
    my, mx = (min(round(abs(n / scale - n) / 2), (n - 1) // 2) for n in (h, w))
    if scale >= 1:
        return image[my:h - my, mx:w - mx], (-my, -mx)
    canvas = np.empty((h + 2 * my, w + 2 * mx, image.shape[2]), image.dtype)
    canvas[:] = image.reshape(-1, image.shape[2]).mean(0).round().astype(image.dtype)
    canvas[my:my + h, mx:mx + w] = image
    return canvas, (my, mx)


def _axes(adapter: Adapter, meta: dict, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per axis (y, x), the input coordinate of each original pixel centre, NaN where the input
    does not show it: read off ``to_original`` of coordinate ramps (a resize, letterbox or crop
    acts on each axis alone)."""
    h, w = int(size[0]), int(size[1])
    ramps = torch.stack([torch.arange(1, h + 1.0)[:, None].expand(h, w), torch.arange(1, w + 1.0).expand(h, w)])
    back = adapter.to_original(ramps, meta).cpu().numpy() - 1
    ys, xs = back[0][:, back.shape[2] // 2], back[1][back.shape[1] // 2]
    return np.where(ys > -0.5, ys, np.nan), np.where(xs > -0.5, xs, np.nan)


def _pull(base: np.ndarray, pixels: int, view: np.ndarray, length: int, shift: int, flip: bool
          ) -> tuple[Tensor, Tensor]:
    """Along one axis: for each of the unaugmented input's ``pixels``, its coordinate in the view's
    input (``length`` pixels) in ``grid_sample`` units, and whether the view shows it. ``base`` and
    ``view`` are ``_axes`` of the unaugmented image and of the view; ``shift``: original -> view."""
    ok, seen = ~np.isnan(base), ~np.isnan(view)
    at = np.arange(pixels, dtype=float)
    if not ok.any() or not seen.any():
        return torch.zeros(pixels), torch.zeros(pixels, dtype=torch.bool)
    coord = np.interp(at, base[ok], np.flatnonzero(ok)) + shift
    if flip:
        coord = len(view) - 1 - coord
    nearest = np.clip(np.round(coord), 0, len(view) - 1).astype(int)
    inside = ((at >= base[ok].min() - 0.5) & (at <= base[ok].max() + 0.5)
              & (coord >= -0.5) & (coord <= len(view) - 0.5) & seen[nearest])
    target = np.interp(coord, np.flatnonzero(seen), view[seen])
    return torch.tensor((target + 0.5) / length * 2 - 1), torch.tensor(inside)


def _tta_view(ex: Explainer, arrays: list[np.ndarray], result: Result, score_fn: Callable,
              view: tuple[float, bool], base: list[tuple[np.ndarray, np.ndarray]], total: Tensor,
              weight: Tensor, views: list[int]) -> None:
    """Explain one augmentation of every image and add its maps, pulled back into the unaugmented
    input frame, to ``total`` (and where the view shows each pixel to ``weight``)."""
    scale, flip = view
    zoomed = [_zoom(a, scale) for a in arrays]
    augmented = [np.ascontiguousarray(z[:, ::-1]) if flip else z for z, _ in zoomed]
    x, metas = ex.preprocess(augmented)
    for idx, group in groups(x):  # views of one input size (all, unless the adapter sizes them apart)
        place = {b: i for i, b in enumerate(idx)}
        own = [u for u, t in enumerate(result.targets) if t.image in place]
        sub = [replace(result.targets[u], image=place[result.targets[u].image]) for u in own]
        shown = [(b, zoomed[b][1], augmented[b]) for b in idx]
        _tta_group(ex, group.to(ex.device), [metas[b] for b in idx], shown, flip, result, own, sub, score_fn, base,
                   (total, weight, views))


def _tta_group(ex: Explainer, x: Tensor, metas: list[dict], shown: list[tuple[int, tuple[int, int], np.ndarray]],
               flip: bool, result: Result, own: list[int], sub: list[Target], score_fn: Callable,
               base: list[tuple[np.ndarray, np.ndarray]], sums: tuple[Tensor, Tensor, list[int]]) -> None:
    """``_tta_view`` for one batch ``x`` of views (``shown``: each one's image in the result, shift and
    augmented image) of the result's targets ``own``, given as ``sub`` (numbered by their view in ``x``)."""
    total, weight, views = sums

    def box(t: Target) -> Sequence[float] | None:
        (dy, dx), (vh, vw) = shown[t.image][1], shown[t.image][2].shape[:2]
        x1, y1, x2, y2 = t.detection.box  # type: ignore[union-attr]
        x1, x2 = min(max(x1 + dx, 0), vw), min(max(x2 + dx, 0), vw)
        y1, y2 = min(max(y1 + dy, 0), vh), min(max(y2 + dy, 0), vh)
        if x2 <= x1 or y2 <= y1:
            return None
        return (vw - x2, y1, vw - x1, y2) if flip else (x1, y1, x2, y2)

    maps, found = _view(ex, x, metas, sub, score_fn, box)
    rows = [own[i] for i in found]
    (h, w), (vh, vw) = result.maps.shape[-2:], x.shape[-2:]
    for k in sorted({sub[i].image for i in found}):
        b, (dy, dx), _ = shown[k]
        ys, xs = _axes(ex.adapter, metas[k], (vh, vw))
        by, bx = base[b]
        gy, iy = _pull(by, h, ys, vh, dy, False)
        gx, ix = _pull(bx, w, xs, vw, dx, flip)
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), -1).float().to(maps.device)
        mask = (iy[:, None] & ix[None, :]).to(maps.device, maps.dtype)
        picked = [i for i, u in enumerate(rows) if result.targets[u].image == b]
        pulled = F.grid_sample(maps[picked][:, None].float(), grid[None].expand(len(picked), -1, -1, -1),
                               mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
        for i, row in zip(picked, pulled.to(maps.dtype)):
            u = rows[i]
            total[u] += row * mask
            weight[u] += mask
            views[u] += 1
