"""Upsample, scale and combine per-layer maps; all in torch, on the maps' device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from camframe.core.errors import CamframeError
from camframe.core.resample import upsample_max, upsample_sum

__all__ = ["AGGREGATES", "NORMALISATIONS", "upsample", "minmax", "density", "aggregate", "parse_aggregate",
           "fold_max"]

AGGREGATES = ("max", "avg")
NORMALISATIONS = ("common", "layer")


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(..., h, w)`` maps to ``size`` (half-pixel centres, like cv2).

    Args:
        maps: ``(..., h, w)`` maps.
        size: ``(H, W)``.

    Returns:
        ``(..., H, W)`` float maps (``maps`` itself when already of that size).
    """
    size = tuple(size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*maps.shape[:-2], *size)


def minmax(maps: Tensor, inplace: bool = False, bounds: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Min-max scale each map to [0, 1]; a constant map becomes all zeros. ``bounds``: each map's
    minimum and maximum, when already known."""
    if bounds is None:
        flat = maps.flatten(1)
        bounds = flat.amin(1), flat.amax(1)  # two reductions: many times faster than aminmax on the CPU
    low, high = bounds
    span = high - low
    tiny = torch.finfo(span.dtype).tiny
    # constant up to rounding, relative to the map's own magnitude (a map's values may all be tiny)
    varies = (span > tiny) & (span > 1e-6 * torch.maximum(high.abs(), low.abs()))
    scale = torch.where(varies, 1 / span.clamp(min=tiny), torch.zeros_like(span))
    out = maps.sub_(low[:, None, None]) if inplace else maps - low[:, None, None]
    return out.mul_(scale[:, None, None])


def density(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(U, h, w)`` maps as densities per pixel of a ``size`` input: divided by the ``(H/h)·(W/w)``
    pixels one cell covers, so that upsampling keeps the total mass (exactly for whole-number factors)."""
    return maps * (maps.shape[-2] * maps.shape[-1] / (size[0] * size[1]))


def parse_aggregate(spec: str) -> tuple[str, str | None]:
    """``max``, ``avg``, or either with a normalisation, ``max-common``, ``avg-layer``...:
    (aggregate, normalisation, None when not given)."""
    how, sep, norm = spec.partition("-")
    if how not in AGGREGATES or (sep and norm not in NORMALISATIONS):
        raise CamframeError(f"unknown aggregate {spec!r}; choose one of {', '.join(AGGREGATES)}, optionally "
                            f"with -{' or -'.join(NORMALISATIONS)} (e.g. max-common)")
    return how, norm or None


def aggregate(maps: dict[str, Tensor], reached: dict[str, Tensor], size: tuple[int, int], how: str,
              normalise: str = "common") -> Tensor:
    """Bring each layer's ``(U, h, w)`` map to ``size`` and combine the layers by ``max`` or ``avg``;
    the result is min-max normalised to [0, 1] once.

    ``normalise="common"``: each map becomes a ``density`` per input pixel, so the layers are
    compared on one scale (for ``elementwise``, the share of the target's score per pixel).
    ``"layer"``: each map is min-max normalised at its own resolution first, as pytorch-grad-cam
    does. A layer that a
    target did not reach (``reached[name]`` is False) takes no part. Upsampling is linear, so for
    ``avg`` all layers are resized and summed in one matrix product (``upsample_sum``), and for ``max``
    folded block of rows by block of rows (``upsample_max``): either way the full-size stack is written
    once. ``how`` and ``normalise`` were checked by the caller.
    """
    count: Tensor | None = None
    lows: list[Tensor] = []
    for name, low in maps.items():
        mask = reached[name].to(low.dtype)[:, None, None]
        if normalise == "layer":
            low = minmax(low).mul_(mask)
        else:
            low = density(low * mask, size)
        count = mask.clone() if count is None else count.add_(mask)
        lows.append(low)
    assert count is not None
    if how == "max":
        combined, low, high = upsample_max(lows, size)
        return minmax(combined, inplace=True, bounds=(low, high))
    return minmax(upsample_sum(lows, size).div_(count.clamp(min=1)), inplace=True)


def fold_max(stack: Tensor | None, heat: Tensor) -> Tensor:
    """``stack`` raised to ``heat`` pixel by pixel, in place; a copy of ``heat`` when ``stack`` is None."""
    return heat.clone() if stack is None else torch.maximum(stack, heat, out=stack)
