"""Batches whose images' model inputs differ in size: explained in same-size groups, merged into one result.

An adapter's ``preprocess`` may return a list of per-image ``(C, H, W)`` tensors instead of one batch
(e.g. a rectangular letterbox per image, as Ultralytics' ``predict()`` gives one image). The Explainer runs
each group of equal sizes as one batch and merges the groups' results: per-target and per-image tensors
zero-padded at the bottom and right to the largest size, ``Result.sizes`` holding each image's own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor
from torch.nn.functional import pad

if TYPE_CHECKING:
    from camframe.engine.explainer import Result

__all__ = ["batch", "groups", "merge"]


def batch(tensors: Sequence[Tensor]) -> Tensor | list[Tensor]:
    """Per-image ``(C, H, W)`` tensors as one ``(B, C, H, W)`` batch, or as a list where their sizes differ."""
    return torch.stack(list(tensors)) if len({t.shape for t in tensors}) == 1 else list(tensors)


def groups(x: Tensor | Sequence[Tensor]) -> list[tuple[list[int], Tensor]]:
    """The images of ``x`` in groups of one size (in order of first appearance), each with its batch."""
    if isinstance(x, Tensor):
        return [(list(range(len(x))), x)]
    found: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(x):
        found.setdefault(tuple(t.shape), []).append(i)
    return [(idx, torch.stack([x[i] for i in idx])) for idx in found.values()]


def _padded(tensors: list[Tensor]) -> Tensor:
    """``tensors`` (equal but for the last two sizes) zero-padded at the bottom and right, concatenated."""
    h, w = max(t.shape[-2] for t in tensors), max(t.shape[-1] for t in tensors)
    return torch.cat([pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in tensors])


def merge(parts: list[tuple[list[int], Result]], metas: list[dict]) -> Result:
    """One result of the groups' ``parts`` (each with its images' places in the whole batch): targets in
    image order (an image's in its group's order), tensors padded to the largest size, ``sizes`` set."""
    first = parts[0][1]
    offsets = [0]
    for _, r in parts:
        offsets.append(offsets[-1] + len(r.targets))
    rows = sorted(((idx[t.image], p, u) for p, (idx, r) in enumerate(parts) for u, t in enumerate(r.targets)),
                  key=lambda row: row[0])
    order = torch.tensor([offsets[p] + u for _, p, u in rows], dtype=torch.long)
    targets = [replace(parts[p][1].targets[u], image=b) for b, p, u in rows]

    def per_target(get: Callable[[Result], Tensor | None], spatial: bool = True) -> Tensor | None:
        tensors = [get(r) for _, r in parts]
        if any(t is None for t in tensors):
            return None
        joined = _padded(tensors) if spatial else torch.cat(tensors)  # type: ignore[arg-type]
        return joined[order.to(joined.device)]

    def layer(name: str, spatial: bool) -> Tensor:
        source = "layer_maps" if spatial else "reached"
        empty = first.maps.new_zeros(0, 1, 1) if spatial else torch.zeros(0, dtype=torch.bool, device=first.maps.device)
        return per_target(lambda r: getattr(r, source).get(name, empty), spatial)  # type: ignore[return-value]

    names = list(dict.fromkeys(n for _, r in parts for n in r.layer_maps))
    places = [b for idx, _ in parts for b in idx]
    inputs = None
    if all(r.inputs is not None for _, r in parts):
        inputs = _padded([r.inputs for _, r in parts])[torch.tensor(places).argsort()]  # type: ignore[misc]
    detections = None
    if all(r.detections is not None for _, r in parts):
        detections = [[] for _ in metas]
        for idx, r in parts:
            for b, dets in zip(idx, r.detections):  # type: ignore[arg-type]
                detections[b] = dets
    sizes = [(0, 0)] * len(metas)
    for idx, r in parts:
        for b in idx:
            sizes[b] = (int(r.maps.shape[-2]), int(r.maps.shape[-1]))
    outcomes = None
    if all(r.outcomes is not None for _, r in parts):
        outcomes = [{} for _ in metas]
        for idx, r in parts:
            for b, info in zip(idx, r.outcomes):  # type: ignore[arg-type]
                outcomes[b] = info
    views = None if any(r.views is None for _, r in parts) else [parts[p][1].views[u] for _, p, u in rows]
    return replace(first, targets=targets, maps=per_target(lambda r: r.maps), metas=list(metas),
                   layer_maps={n: layer(n, True) for n in names}, reached={n: layer(n, False) for n in names},
                   detections=detections, inputs=inputs, guided=per_target(lambda r: r.guided),
                   guided_gradcam=per_target(lambda r: r.guided_gradcam), views=views, sizes=sizes,
                   outcomes=outcomes)
