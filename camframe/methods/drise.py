"""D-RISE (Petsiuk et al. 2021): per-box saliency of any detector from random masks, no gradients.

Each of N random masks ``M`` (RISE's: a ``grid`` x ``grid`` binary grid, each cell kept with
probability ``keep``, upsampled bilinearly to ``grid + 1`` cells and shifted by a random fraction of
a cell) blends the preprocessed input with the adapter's neutral pixel, ``x * M + fill * (1 - M)``.
The masked images run through the model and the adapter's own ``detect``; a mask's weight for a
target is the best match among the masked detections, ``IoU(box) x class similarity``. The map is
``1/N sum_i (w_i - mean(w)) M_i``: the paper's weighted sum of masks, less what the masks' uneven
coverage alone would paint (as ``vision-explanation-methods`` does with ``normalize=True``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camframe.adapters.base import Adapter, Detection, Target
from camframe.adapters.detector import DetectorAdapter
from camframe.core.boxes import box_iou
from camframe.core.errors import CamframeError

__all__ = ["DRise", "plan", "masks_from_grids", "weights", "saliency"]


def _cell(size: Sequence[int], grid: int) -> tuple[int, int]:
    return math.ceil(size[0] / grid), math.ceil(size[1] / grid)


def plan(n: int, size: Sequence[int], grid: int = 16, keep: float = 0.5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` masks for an input of ``size`` (H, W), as drawn from ``seed``: the binary grids
    ``(n, grid, grid)`` and each mask's shift ``(n, 2)`` (dy, dx) in pixels, within one cell."""
    generator = torch.Generator().manual_seed(seed)
    grids = torch.rand(n, grid, grid, generator=generator) < keep
    shifts = torch.stack([torch.randint(0, c, (n,), generator=generator) for c in _cell(size, grid)], 1)
    return grids, shifts


def masks_from_grids(grids: Tensor, shifts: Tensor, size: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """The masks ``(m, H, W)`` in [0, 1]: each grid upsampled bilinearly to ``grid + 1`` cells, cropped at its shift."""
    (h, w), (ch, cw), g = size, _cell(size, grids.shape[-1]), grids.shape[-1]
    up = F.interpolate(grids[:, None].to(device, torch.float32), size=((g + 1) * ch, (g + 1) * cw),
                       mode="bilinear", align_corners=False)[:, 0]
    return torch.stack([u[dy:dy + h, dx:dx + w] for u, (dy, dx) in zip(up, shifts.tolist())])


def _vector(t: Target) -> Tensor:
    """The target's class vector: its detection's own ``probs`` for the class it was detected as,
    else one-hot of the asked class (the paper's user-defined target)."""
    assert t.detection is not None and t.detection.probs is not None
    probs = t.detection.probs.float()
    if t.class_id == t.detection.class_id:
        return probs
    return F.one_hot(torch.tensor(t.class_id), len(probs)).float()


def weights(targets: Sequence[Target], detections: Sequence[Detection]) -> Tensor:
    """Each target's weight for one masked image: the max over ``detections`` of IoU with the
    target's box times class similarity, the cosine of the ``probs`` vectors where the target and
    every detection carry them, else the detection's score if it is of the target's class."""
    if not detections:
        return torch.zeros(len(targets))
    own = [t.detection for t in targets]
    iou = box_iou(torch.tensor([d.box for d in own], dtype=torch.float32),  # type: ignore[union-attr]
               torch.tensor([d.box for d in detections], dtype=torch.float32))
    vectors = [d.probs for d in detections]
    if all(d is not None and d.probs is not None for d in own) and all(v is not None for v in vectors):
        wanted = F.normalize(torch.stack([_vector(t) for t in targets]), dim=1)
        similarity = wanted @ F.normalize(torch.stack(vectors).float(), dim=1).T  # type: ignore[arg-type]
    else:
        scores = torch.tensor([d.score for d in detections])
        same = torch.tensor([[d.class_id == t.class_id for d in detections] for t in targets])
        similarity = scores[None] * same
    return (iou * similarity).amax(1).clamp(min=0)


def saliency(weighted: Tensor, coverage: Tensor, total: Tensor, n: int) -> Tensor:
    """``1/n sum_i (w_i - mean(w)) M_i`` from the sums ``sum_i w_i M_i`` ``(T, ...)``, ``sum_i M_i``
    and ``sum_i w_i`` ``(T,)``."""
    return (weighted - (total / n).view(-1, *[1] * coverage.dim()) * coverage) / n


def _fill(adapter: Adapter, x: Tensor) -> Tensor:
    fill = torch.as_tensor(adapter.fill_value, dtype=x.dtype, device=x.device).reshape(-1)
    if len(fill) not in (1, x.shape[1]):
        raise CamframeError(f"adapter {adapter.name!r}: fill_value has {len(fill)} values for {x.shape[1]} channels")
    return fill.view(-1, 1, 1)


class DRise:
    """The ``drise`` method: a black-box method, called on the model and its input rather than on
    a layer's activations and gradients. Options: ``masks`` (N), ``seed``, ``mask_batch`` (masked
    images per forward), ``grid`` (cells per side) and ``keep`` (the probability a cell shows)."""

    needs_gradients = False
    black_box = True
    defaults: dict[str, Any] = {"masks": 1000, "seed": 0, "mask_batch": 32, "grid": 16, "keep": 0.5}

    def configure(self, adapter: Adapter, **options: Any) -> dict[str, Any]:
        """``options`` checked for ``adapter``, over the defaults."""
        if not isinstance(adapter, DetectorAdapter):
            raise CamframeError(f"method drise explains a detector's boxes; adapter {adapter.name!r} "
                                "explains whole images: choose a gradient method")
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise CamframeError(f"method drise takes no option {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(self.defaults)}")
        merged = {**self.defaults, **options}
        for key in ("masks", "seed", "mask_batch", "grid"):
            value, least = merged[key], 0 if key == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise CamframeError(f"{key.replace('_', '-')} must be a whole number >= {least}, got {value!r}")
        if isinstance(merged["keep"], bool) or not isinstance(merged["keep"], (int, float)) \
                or not 0 < merged["keep"] < 1:
            raise CamframeError(f"keep must lie strictly between 0 and 1, got {merged['keep']!r}")
        return merged

    def __call__(self, model: nn.Module, adapter: DetectorAdapter, x: Tensor, metas: list[dict],
                 targets: list[Target], masks: int, seed: int, mask_batch: int, grid: int, keep: float) -> Tensor:
        """The signed D-RISE map ``(U, H, W)`` of each target at input resolution (run under ``no_grad``).
        Every image gets the same masks, drawn from ``seed``, so a map does not depend on the batch."""
        for t in targets:
            if t.detection is None or t.class_id is None or t.class_id < 0:
                raise CamframeError(f"drise explains a box's class; target {t.class_name!r} is not one")
        size = tuple(x.shape[-2:])
        grids, shifts = plan(masks, size, grid, keep, seed)
        fill, conf = _fill(adapter, x), adapter.rescore_threshold()
        out = x.new_zeros(len(targets), *size)
        for b in sorted({t.image for t in targets}):
            rows = [u for u, t in enumerate(targets) if t.image == b]
            mine = [targets[u] for u in rows]
            weighted, coverage, total = x.new_zeros(len(rows), size[0] * size[1]), x.new_zeros(size[0] * size[1]), \
                x.new_zeros(len(rows))
            for start in range(0, masks, mask_batch):
                m = masks_from_grids(grids[start:start + mask_batch], shifts[start:start + mask_batch], size, x.device)
                outputs = model(x[b] * m[:, None] + fill * (1 - m[:, None]))
                found = adapter.detect(outputs, [metas[b]] * len(m), model, conf=conf)
                w = torch.stack([weights(mine, dets) for dets in found], 1).to(x.device, x.dtype)  # (rows, masks)
                flat = m.flatten(1)
                weighted += w @ flat
                coverage += flat.sum(0)
                total += w.sum(1)
            out[rows] = saliency(weighted, coverage, total, masks).view(len(rows), *size)
        return out


DRISE = DRise()
