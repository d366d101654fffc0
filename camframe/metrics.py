"""Explanation-quality metrics for saliency maps.

Conventions used throughout:

* a saliency map batch is a float tensor ``(N, H, W)``, expected non-negative,
  any scale;
* boxes are ``(N, 4)`` ``xyxy`` in pixel coordinates of the map; a box covers
  pixel ``(y, x)`` when its centre ``(x + 0.5, y + 0.5)`` lies inside the box
  (borders inclusive);
* where noted, binary masks ``(N, H, W)`` may be given instead of boxes.

All metrics are batched torch code and run on the device of their inputs.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "box_masks",
    "pointing_game",
    "energy_pointing_game",
    "object_discrimination",
    "deletion_insertion",
    "sanity_check",
    "randomize_layers",
    "mean_ci",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- #
# Regions
# --------------------------------------------------------------------------- #
def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """Rasterise ``(N, 4)`` xyxy boxes to a ``(N, height, width)`` bool mask.

    Pixel ``(y, x)`` is covered when ``x1 <= x + 0.5 <= x2`` and
    ``y1 <= y + 0.5 <= y2``.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))
    in_x = (x1 <= xs) & (xs <= x2)  # (N, W)
    in_y = (y1 <= ys) & (ys <= y2)  # (N, H)
    return in_y[:, :, None] & in_x[:, None, :]


def _check_maps(maps: Tensor) -> Tensor:
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {tuple(maps.shape)}")
    return maps if maps.is_floating_point() else maps.float()


def _region(maps: Tensor, boxes: Tensor | None, masks: Tensor | None) -> Tensor:
    """Bool ``(N, H, W)`` target region from exactly one of ``boxes``/``masks``."""
    if (boxes is None) == (masks is None):
        raise ValueError("give exactly one of `boxes` or `masks`")
    n, h, w = maps.shape
    if boxes is not None:
        if boxes.shape != (n, 4):
            raise ValueError(f"boxes must have shape ({n}, 4), got {tuple(boxes.shape)}")
        return box_masks(boxes.to(maps.device), h, w)
    assert masks is not None
    if masks.shape != maps.shape:
        raise ValueError(f"masks must have shape {tuple(maps.shape)}, got {tuple(masks.shape)}")
    return masks.to(maps.device) != 0


def _dilate(region: Tensor, radius: int) -> Tensor:
    """Dilate a bool ``(N, H, W)`` mask by a disk of ``radius`` pixels."""
    if radius == 0:
        return region
    r = torch.arange(-radius, radius + 1, device=region.device, dtype=torch.float32)
    disk = (r[:, None] ** 2 + r[None, :] ** 2 <= radius**2).float()
    out = F.conv2d(region[:, None].float(), disk[None, None], padding=radius)
    return out[:, 0] > 0.5


# --------------------------------------------------------------------------- #
# Localisation metrics
# --------------------------------------------------------------------------- #
def pointing_game(
    maps: Tensor,
    boxes: Tensor | None = None,
    masks: Tensor | None = None,
    tolerance: int = 0,
) -> Tensor:
    """Pointing game hit per map, ``(N,)`` bool.

    A hit means a location attaining the map's maximum lies inside the
    object's box/mask, or within ``tolerance`` pixels (Euclidean) of it.
    With several maxima, any one inside counts. An all-zero map is a miss.
    """
    maps = _check_maps(maps)
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    region = _dilate(_region(maps, boxes, masks), int(tolerance))
    peak = maps.amax(dim=(1, 2), keepdim=True)
    at_peak = maps == peak
    return (at_peak & region).flatten(1).any(1) & (peak.flatten() > 0)


def _share(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 wherever ``den`` is not positive."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


def energy_pointing_game(
    maps: Tensor,
    boxes: Tensor | None = None,
    masks: Tensor | None = None,
) -> Tensor:
    """Energy-based pointing game, ``(N,)``: share of map mass inside box/mask.

    Returns 0 for an all-zero map.
    """
    maps = _check_maps(maps)
    region = _region(maps, boxes, masks)
    inside = (maps * region).sum(dim=(1, 2))
    return _share(inside, maps.sum(dim=(1, 2)))


def object_discrimination(maps: Tensor, boxes: Tensor, others: Sequence[Tensor]) -> Tensor:
    """Share of in-object mass that falls on other objects, ``(N,)``; lower is better.

    ``maps[i]`` explains object ``boxes[i]``; ``others[i]`` (``(M_i, 4)``,
    ``M_i`` may be 0) are the boxes of the other objects in the same image.
    The result is ``mass(others \\ own) / mass(own ∪ others)``, and 0 when
    the denominator is 0 (no in-object mass) or there are no other objects.
    """
    maps = _check_maps(maps)
    n, h, w = maps.shape
    own = _region(maps, boxes, None)
    if len(others) != n:
        raise ValueError(f"others must hold one tensor per map ({n}), got {len(others)}")
    flat = [torch.as_tensor(o, device=maps.device).reshape(-1, 4) for o in others]
    counts = torch.tensor([len(o) for o in flat], device=maps.device)
    other_union = torch.zeros(n, h, w, dtype=torch.bool, device=maps.device)
    if int(counts.sum()) > 0:
        all_boxes = torch.cat(flat)
        owner = torch.repeat_interleave(torch.arange(n, device=maps.device), counts)
        hits = torch.zeros(n, h, w, device=maps.device)
        hits.index_add_(0, owner, box_masks(all_boxes, h, w).to(hits.dtype))
        other_union = hits > 0
    num = (maps * (other_union & ~own)).sum(dim=(1, 2))
    den = (maps * (other_union | own)).sum(dim=(1, 2))
    return _share(num, den)


# --------------------------------------------------------------------------- #
# Faithfulness: deletion / insertion
# --------------------------------------------------------------------------- #
def _gaussian_blur(images: Tensor) -> Tensor:
    """Strong separable Gaussian blur, kernel about 1/8 of the smaller side."""
    c, h, w = images.shape[1:]
    k = max(3, 2 * (min(h, w) // 16) + 1)
    sigma = k / 4.0
    x = torch.arange(k, device=images.device, dtype=images.dtype) - (k - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    p = k // 2
    out = F.pad(images, (p, p, p, p), mode="replicate")
    out = F.conv2d(out, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(out, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def _fill_images(
    images: Tensor, fill: str, generator: torch.Generator | None
) -> Tensor:
    if fill == "blur":
        return _gaussian_blur(images)
    if fill == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if fill == "zero":
        return torch.zeros_like(images)
    if fill == "noise":
        gen_device = generator.device if generator is not None else images.device
        u = torch.rand(images.shape, generator=generator, device=gen_device).to(images)
        lo = images.amin(dim=(2, 3), keepdim=True)
        hi = images.amax(dim=(2, 3), keepdim=True)
        return lo + (hi - lo) * u
    raise ValueError(f"fill must be 'blur', 'mean', 'noise' or 'zero', got {fill!r}")


def _schedule(n: int, hw: int, steps: int, area: Tensor | None, extent: float, device: torch.device) -> Tensor:
    """``(N, steps + 1)`` pixels perturbed at each step: ``k * H * W / steps`` (whole image), or
    ``k * extent * area / steps`` capped at ``H * W`` (in units of each image's ``area``)."""
    k = torch.arange(steps + 1, device=device)
    if area is None:
        return (k * hw // steps).expand(n, -1)
    if area.shape != (n,) or not bool((area > 0).all()) or not bool(area.isfinite().all()):
        raise ValueError(f"area must hold {n} positive pixel counts, got {area.tolist()}")
    if not extent > 0:
        raise ValueError(f"extent must be > 0, got {extent}")
    counts = (k[None] * extent * area.to(device, torch.float64)[:, None] / steps).floor().long()
    return counts.clamp(max=hw)


@torch.no_grad()
def deletion_insertion(
    images: Tensor,
    maps: Tensor,
    score_fn: ScoreFn,
    steps: int = 20,
    mode: Literal["deletion", "insertion"] = "deletion",
    fill: Literal["blur", "mean", "noise", "zero"] = "blur",
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    area: Tensor | None = None,
    extent: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Deletion / insertion curves (Petsiuk et al., RISE) and their AUC.

    Pixels are ranked by saliency (descending; ties by raster order). At
    step ``k`` the top ``n_k`` pixels are replaced by the fill image
    (deletion) or revealed on top of it (insertion). The schedule is either
    the whole image, ``n_k = floor(k * H * W / steps)`` (``area`` None, as in
    the literature), or relative to a region of each image, ``n_k =
    floor(k * extent * area / steps)`` capped at ``H * W``, where ``area`` is
    ``(N,)`` pixel counts at image resolution (e.g. the target box's area):
    with a small box a whole-image step removes more than the box, and the
    curve no longer tells maps apart. Every perturbed image is scored in
    chunks of at most ``batch_size`` rows by ``score_fn(batch (M, C, H, W),
    source (M,) long)``, which returns ``(M,)`` scores; ``source`` gives each
    row's image index.

    Scores are divided by the score of the unperturbed image (scored once
    more where the schedule does not include it), giving NaN rows where that
    score is 0; a step at which the target is gone scores 0. Returns the
    ``(N, steps + 1)`` curve and its ``(N,)`` trapezoidal AUC over the
    schedule's range rescaled to ``[0, 1]``. Maps must already be at image
    resolution.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    maps = _check_maps(maps)
    n, c, h, w = images.shape
    if maps.shape != (n, h, w):
        raise ValueError(f"maps must have shape {(n, h, w)} (upsample first), got {tuple(maps.shape)}")
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    if not images.is_floating_point():
        images = images.float()

    device = images.device
    hw = h * w
    counts = _schedule(n, hw, steps, area, extent, device)
    if mode == "insertion" and area is not None:  # the unperturbed image: everything revealed
        counts = torch.cat([counts, torch.full((n, 1), hw, device=device)], dim=1)
    filled = _fill_images(images, fill, generator)
    # deletion: pixels with rank < n_k come from the fill; insertion: from the image
    top, rest = (filled, images) if mode == "deletion" else (images, filled)

    order = maps.to(device).reshape(n, hw).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(hw, device=device).expand(n, hw))

    cols = counts.shape[1]
    rows = n * cols
    scores = torch.empty(rows, device=device, dtype=torch.promote_types(images.dtype, torch.float32))
    for start in range(0, rows, batch_size):
        row = torch.arange(start, min(start + batch_size, rows), device=device)
        src, step = row // cols, row % cols
        mask = (rank[src] < counts[src, step, None]).view(-1, 1, h, w)
        out = torch.as_tensor(score_fn(torch.where(mask, top[src], rest[src]), src))
        if out.numel() != len(row):
            raise ValueError(f"score_fn returned {out.numel()} scores for {len(row)} rows")
        scores[start : start + len(row)] = out.reshape(-1).to(scores)

    scores = scores.view(n, cols)
    original = scores[:, 0] if mode == "deletion" else scores[:, -1]
    scores = scores[:, : steps + 1]
    curve = torch.where(
        original[:, None] != 0,
        scores / torch.where(original != 0, original, torch.ones_like(original))[:, None],
        torch.nan,
    )
    auc = torch.trapezoid(curve, dx=1.0 / steps, dim=1)
    return curve, auc


# --------------------------------------------------------------------------- #
# Sanity checks (Adebayo et al., 2018)
# --------------------------------------------------------------------------- #
def _average_ranks(x: Tensor) -> Tensor:
    """Row-wise ranks of ``(N, L)`` values, ties given their average rank."""
    n, length = x.shape
    values, order = x.sort(dim=1, stable=True)
    pos = torch.arange(length, device=x.device).expand(n, length)
    first = torch.ones_like(values, dtype=torch.bool)
    first[:, 1:] = values[:, 1:] != values[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, pos, 0).cummax(dim=1).values
    end = torch.where(last, pos, length).flip(1).cummin(dim=1).values.flip(1)
    avg = (start + end).to(torch.float64 if x.device.type != "mps" else torch.float32) / 2
    return torch.empty_like(avg).scatter_(1, order, avg)


def sanity_check(map_a: Tensor, map_b: Tensor) -> Tensor:
    """Spearman rank correlation per map pair, ``(N,)``.

    ``map_b`` typically comes from a copy of the model with its top layers
    re-initialised (see :func:`randomize_layers`); a faithful explanation
    method should give low correlation. Ties get average ranks. A pair with a
    constant map has no defined correlation and gives NaN.
    """
    map_a, map_b = _check_maps(map_a), _check_maps(map_b)
    if map_a.shape != map_b.shape:
        raise ValueError(f"map shapes differ: {tuple(map_a.shape)} vs {tuple(map_b.shape)}")
    ra = _average_ranks(map_a.flatten(1))
    rb = _average_ranks(map_b.to(map_a.device).flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    rho = (ra * rb).sum(1) / torch.where(den > 0, den, torch.ones_like(den))
    rho = torch.where(den > 0, rho.clamp(-1.0, 1.0), torch.nan)
    return rho.to(map_a.dtype)


def randomize_layers(model: nn.Module, names: Sequence[str], seed: int = 0) -> nn.Module:
    """Deep copy of ``model`` with the named submodules re-initialised.

    Every module inside each named submodule that has ``reset_parameters()``
    is reset, under ``torch.manual_seed(seed)``; the global RNG state and the
    original model are left untouched. Raises ``AttributeError`` for an
    unknown name and warns about parameters no ``reset_parameters`` covers.
    """
    clone = copy.deepcopy(model)
    targets = [clone.get_submodule(name) for name in names]
    cuda = sorted({p.device.index or 0 for p in clone.parameters() if p.device.type == "cuda"})
    uncovered = []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for name, target in zip(names, targets):
            for sub_name, module in target.named_modules(prefix=name):
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
                else:
                    uncovered += [f"{sub_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    if uncovered:
        warnings.warn(f"no reset_parameters() for {uncovered}; left unchanged", stacklevel=2)
    return clone


# --------------------------------------------------------------------------- #
# Confidence intervals
# --------------------------------------------------------------------------- #
# two-sided Student-t critical values, df = 1..29
_T_TABLE: dict[float, tuple[float, ...]] = {
    0.90: (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812,
           1.796, 1.782, 1.771, 1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725,
           1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699),
    0.95: (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
           2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
           2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045),
    0.99: (63.657, 9.925, 5.841, 4.604, 4.032, 3.707, 3.499, 3.355, 3.250, 3.169,
           3.106, 3.055, 3.012, 2.977, 2.947, 2.921, 2.898, 2.878, 2.861, 2.845,
           2.831, 2.819, 2.807, 2.797, 2.787, 2.779, 2.771, 2.763, 2.756),
}  # fmt: skip


def _t_critical(df: int, key: float) -> float:
    if df < 30:
        return _T_TABLE[key][df - 1]
    # Cornish-Fisher expansion of the t quantile around the normal one (|err| < 1e-4)
    z = float(torch.special.ndtri(torch.tensor((1 + key) / 2, dtype=torch.float64)))
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def mean_ci(
    values: Tensor | Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval: ``(mean, low, high)``.

    NaNs are ignored. One value gives ``(v, v, v)``; no values give NaNs.
    ``confidence`` must be 0.90, 0.95 or 0.99 (tabulated t for n <= 30,
    Cornish-Fisher t approximation beyond). With ``bounds=(a, b)``, the range
    every value lies in, the interval stays within it: values all equal to
    ``a`` or ``b`` (hits and misses) get the Wilson score interval of their
    proportion, others the t interval cut at ``a`` and ``b`` (the mean lies
    in ``[a, b]``, so cutting never lowers the coverage).
    """
    key = next((k for k in _T_TABLE if math.isclose(k, confidence)), None)
    if key is None:
        raise ValueError(f"confidence must be one of {sorted(_T_TABLE)}, got {confidence}")
    x = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    x = x[~x.isnan()]
    n = x.numel()
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if bounds is not None:
        a, b = bounds
        if not bool(((x >= a) & (x <= b)).all()):
            raise ValueError(f"values must lie in [{a}, {b}]")
        if b > a and bool(((x == a) | (x == b)).all()):
            low, high = _wilson(mean=(mean - a) / (b - a), n=n, key=key)
            return (mean, a + (b - a) * low, a + (b - a) * high)
    if n == 1:
        return (mean, mean, mean)
    half = _t_critical(n - 1, key) * float(x.std()) / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return (mean, low, high)


def _wilson(mean: float, n: int, key: float) -> tuple[float, float]:
    """Wilson score interval of a proportion ``mean`` out of ``n`` trials."""
    z = float(torch.special.ndtri(torch.tensor((1 + key) / 2, dtype=torch.float64)))
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


