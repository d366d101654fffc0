"""Support-grouped gradients: targets whose gradients cannot meet share one backward pass.

A target's score reaches a captured layer only through a window of it (its receptive field there).
Targets of one image whose windows are disjoint at every captured layer are summed in one
``autograd.grad``; each one's gradient is the sum's gradient masked to its own window, exactly.

Windows are derived structurally, never from one image's gradient (where a ReLU can hide part of
one). Where the head reads a fixed region of the captured layers (a two-stage detector's RoI), the
adapter gives the window by arithmetic (``Adapter.footprint``), widened by ``MARGIN`` cells; no probe
is needed. Otherwise: a probe backward through the model *linearised* in place for the moment
(activation modules made the identity, each convolution's and linear layer's weights made ``|w|``
normalised per output channel with no bias, batch norms, frozen ones too, the identity, max-pools
average-pools), from an input of ones, so every path carries a positive gradient and none cancels; a
probe that overflows bounds nothing. The probe runs once per adapter anchor key (a head level, say)
and ratio of the layers' map sizes to the key's grid, from a cell in the middle of its grid; its
bounding rectangle at each layer is translated to every other cell of that grid, and of any grid of
the same ratios (inputs of other sizes), by the layer's stride ratio, with a ``MARGIN`` of cells for
the rounding of up- and down-sampling. A rectangle that touches a map's border at the probe cell
cannot be translated safely: that key's targets are not grouped at that size (another size is probed
afresh), nor are targets the adapter neither bounds nor anchors (``footprint`` and ``anchor`` return
None).
"""

from __future__ import annotations

import math
from fractions import Fraction
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from camframe.adapters.base import Rect
from camframe.core.capture import grad

__all__ = ["MARGIN", "Rect", "Support", "clique", "color", "conflicts"]

MARGIN = 2  # cells added on each side of a translated window or a footprint
Window = dict[str, Rect | None]  # per layer: the rectangle, or None where the target does not reach it
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
               nn.Hardsigmoid, nn.Mish, nn.ELU, nn.PReLU, nn.Softplus)


@contextmanager
def linearised(model: nn.Module) -> Iterator[None]:
    """``model`` with positive, linear, non-cancelling gradients while inside; restored exactly after."""
    # written through ``.data`` (no version bump): the real forward's graph, which saved some of these
    # tensors for its backward, finds them exactly as they were once restored
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    handles, inplace = [], []
    try:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)):
                    w = m.weight.data.abs()
                    m.weight.data.copy_(w / w.sum(tuple(range(1, w.dim())), keepdim=True).clamp(min=1e-30))
                    if m.bias is not None:
                        m.bias.data.zero_()
                elif isinstance(getattr(m, "running_var", None), Tensor):  # a batch norm, frozen ones included
                    m.running_mean.data.zero_()
                    m.running_var.data.fill_(1 - getattr(m, "eps", 0.0))
                    if isinstance(getattr(m, "weight", None), Tensor):
                        m.weight.data.fill_(1)
                        m.bias.data.zero_()
                elif isinstance(m, ACTIVATIONS):
                    if getattr(m, "inplace", False):
                        m.inplace = False
                        inplace.append(m)
                    handles.append(m.register_forward_hook(lambda _m, inputs, _out: inputs[0]))
                elif isinstance(m, nn.MaxPool2d):
                    handles.append(m.register_forward_hook(_avg_pool))
        yield
    finally:
        for h in handles:
            h.remove()
        for m in inplace:
            m.inplace = True
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                v.data.copy_(saved[k])


def _avg_pool(m: nn.MaxPool2d, inputs: tuple, _out: Tensor) -> Tensor:
    """A max-pool's window averaged: every input of the window reaches the output."""
    k, d = nn.modules.utils._pair(m.kernel_size), nn.modules.utils._pair(m.dilation)
    span = tuple(di * (ki - 1) + 1 for ki, di in zip(k, d))  # a dilated window's whole extent
    return torch.nn.functional.avg_pool2d(inputs[0], span, m.stride, m.padding, m.ceil_mode)


class Support:
    """Each target's window at each captured layer: the adapter's footprint, else a probe template (cached
    per anchor key) placed at the target's cell."""

    def __init__(self, model: nn.Module, adapter: Any) -> None:
        self.model = model
        self.adapter = adapter
        self._templates: dict[Hashable, dict[str, tuple[float, float, float, float] | None]] = {}
        self._refused: set[tuple[Hashable, tuple]] = set()  # keys whose probe at these map sizes bounded nothing

    def windows(self, targets: Sequence[Any], outputs: Any, layer_shapes: Callable[[], dict[str, tuple[int, int]]],
                probe: Callable[[], tuple[Any, dict[str, Tensor]]], score_fn: Callable) -> list[Window | None]:
        """Each target's window per layer (maps of the sizes ``layer_shapes()`` gives), or None: unbounded.
        ``probe`` runs the model on a one-image input of ones and returns its outputs and captured layers."""
        lazy = _Shapes(layer_shapes)  # looked at only where the adapter bounds a target
        found = [_widen(self.adapter.footprint(t, outputs, lazy), lazy) for t in targets]
        anchors = [None if f is not None else self.adapter.anchor(t, outputs) for t, f in zip(targets, found)]
        bounded = [t.image for t, f, a in zip(targets, found, anchors) if f is not None or a is not None]
        if len(set(bounded)) == len(bounded):  # no image has two targets to group: nothing more is done
            return [None] * len(targets)
        if all(a is None for a in anchors):
            return found
        shapes = dict(lazy)
        keys = [None if a is None else _key(a, shapes) for a in anchors]
        here = tuple(sorted(shapes.items()))
        missing = {k: (t, a[1]) for t, a, k in zip(targets, anchors, keys)
                   if a is not None and k not in self._templates and (k, here) not in self._refused}
        if missing:
            self._probe(missing, shapes, probe, score_fn)
        return [f if k not in self._templates else _place(self._templates[k], a[1], a[2], shapes)
                for f, k, a in zip(found, keys, anchors)]

    def _probe(self, missing: dict[Hashable, tuple[Any, tuple[int, int]]], shapes: dict[str, tuple[int, int]],
               probe: Callable[[], tuple[Any, dict[str, Tensor]]], score_fn: Callable) -> None:
        """Templates of the ``missing`` keys (each with a target and its grid) from one probe forward
        through the linearised model and one backward per key."""
        with linearised(self.model), torch.enable_grad():
            outputs, acts = probe()
            names = list(acts)
            for i, (key, (target, grid)) in enumerate(missing.items()):
                centre = (grid[0] // 2, grid[1] // 2)
                score = score_fn(outputs, [self.adapter.at_cell(target, centre, outputs)]).sum()
                grads = grad(score, [acts[n] for n in names], retain_graph=i < len(missing) - 1) \
                    if score.requires_grad else None
                template = None if grads is None else self._template(names, grads, grid, centre, shapes)
                if template is None:  # bounds nothing at this size; another size may be probed
                    self._refused.add((key, tuple(sorted(shapes.items()))))
                else:
                    self._templates[key] = template

    def _template(self, names: list[str], grads: Sequence[Tensor], grid: tuple[int, int], centre: tuple[int, int],
                  shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[float, float, float, float] | None] | None:
        """Per layer, the probe's support rectangle from ``centre`` of ``grid``, relative to that cell's
        position scaled to the layer (None: not reached); None if it cannot be translated."""
        template: dict[str, tuple[float, float, float, float] | None] = {}
        for n, g in zip(names, grads):
            module, sep, call = n.rpartition("#")
            g = self.adapter.feature_map(module if sep and call.isdigit() else n, g.detach())
            reach = g[0].abs().sum(0) > 0
            h, w = reach.shape
            if (h, w) != tuple(shapes[n]) or not bool(torch.isfinite(g).all()):  # overflow: nothing is bounded
                return None
            if not reach.any():
                template[n] = None
                continue
            rows, cols = reach.any(1).nonzero()[:, 0], reach.any(0).nonzero()[:, 0]
            y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
            if y0 == 0 or x0 == 0 or y1 == h - 1 or x1 == w - 1:  # clipped by the border: not translatable
                return None
            cy, cx = centre[0] * h / grid[0], centre[1] * w / grid[1]
            template[n] = (y0 - cy, y1 - cy, x0 - cx, x1 - cx)
        return template


def _key(anchor: tuple[Any, tuple[int, int], tuple[int, int]], shapes: dict[str, tuple[int, int]]) -> Hashable:
    """Targets share a template where they are alike up to translation: the anchor's key, and each layer's
    map size over the anchor grid's (exact fractions: a fully convolutional model's receptive fields are the
    same, relative to the cell, at any input size with these ratios; what a border cuts off stays cut off)."""
    (h, w) = anchor[1]
    return anchor[0], tuple((n, Fraction(s[0], h), Fraction(s[1], w)) for n, s in sorted(shapes.items()))


class _Shapes(Mapping[str, tuple[int, int]]):
    """The captured layers' map sizes, computed on first use."""

    def __init__(self, compute: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self._compute, self._shapes = compute, None

    def _get(self) -> dict[str, tuple[int, int]]:
        if self._shapes is None:
            self._shapes = {n: (int(s[0]), int(s[1])) for n, s in self._compute().items()}
        return self._shapes

    def __getitem__(self, name: str) -> tuple[int, int]:
        return self._get()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _widen(footprint: dict[str, Rect | None] | None, shapes: Mapping[str, tuple[int, int]]) -> Window | None:
    """An adapter's footprint widened by ``MARGIN`` and clipped to each map; None (unbounded) unless it
    names exactly the captured layers."""
    if footprint is None or set(footprint) != set(shapes):
        return None
    return {n: None if r is None else _widened(r, shapes[n]) for n, r in footprint.items()}


def _widened(rect: Rect, shape: tuple[int, int]) -> Rect:
    """``rect`` widened by ``MARGIN`` cells on each side, clipped to a map of ``shape``."""
    return (max(rect[0] - MARGIN, 0), min(rect[1] + MARGIN, shape[0] - 1),
            max(rect[2] - MARGIN, 0), min(rect[3] + MARGIN, shape[1] - 1))


def _place(template: dict[str, tuple[float, float, float, float] | None], grid: tuple[int, int],
           cell: tuple[int, int], shapes: dict[str, tuple[int, int]]) -> Window:
    """``template`` translated to ``cell`` of ``grid``, widened by ``MARGIN`` and clipped to each map."""
    out: Window = {}
    for n, rel in template.items():
        if rel is None:
            out[n] = None
            continue
        h, w = shapes[n]
        cy, cx = cell[0] * h / grid[0], cell[1] * w / grid[1]
        out[n] = _widened((math.floor(cy + rel[0]), math.ceil(cy + rel[1]), math.floor(cx + rel[2]),
                           math.ceil(cx + rel[3])), (h, w))
    return out


def conflicts(windows: Sequence[Window | None]) -> np.ndarray:
    """``(T, T)`` booleans: whether two targets' windows overlap at some layer (an unbounded one meets every other)."""
    names = sorted({n for w in windows if w is not None for n in w})
    rects = np.zeros((len(windows), len(names), 4), dtype=np.int64)
    present = np.zeros((len(windows), len(names)), dtype=bool)
    for i, w in enumerate(windows):
        for k, n in enumerate(names):
            if w is not None and w.get(n) is not None:
                rects[i, k], present[i, k] = w[n], True
    a, b = rects[:, None], rects[None]
    overlap = (a[..., 0] <= b[..., 1]) & (b[..., 0] <= a[..., 1]) & (a[..., 2] <= b[..., 3]) & (b[..., 2] <= a[..., 3])
    unbounded = np.array([w is None for w in windows])
    return (overlap & present[:, None] & present[None]).any(-1) | unbounded[:, None] | unbounded[None]


def _dsatur(conflict: np.ndarray) -> list[list[int]]:
    """Groups of targets pairwise without conflict, by DSatur (Brélaz): the target whose conflicts already hold
    the most groups is placed first, in the first group it may join."""
    n = len(conflict)
    group = np.full(n, -1)
    degree = conflict.sum(1)
    seen: list[set[int]] = [set() for _ in range(n)]  # the groups of each target's placed conflicts
    for _ in range(n):
        i = max(np.flatnonzero(group < 0).tolist(), key=lambda j: (len(seen[j]), degree[j], -j))
        g = next(g for g in range(n) if g not in seen[i])
        group[i] = g
        for j in np.flatnonzero(conflict[i] & (group < 0)).tolist():
            seen[j].add(g)
    return [np.flatnonzero(group == g).tolist() for g in range(int(group.max()) + 1)] if n else []


def clique(conflict: np.ndarray, starts: int = 16) -> int:
    """The size of a set of targets that all meet one another, found greedily from the ``starts`` targets
    meeting the most: a lower bound on the groups any exact grouping of them needs."""
    order = np.argsort(-conflict.sum(1), kind="stable")
    best = 0
    for v in order[:starts].tolist():
        members, common = 1, conflict[v].copy()
        common[v] = False
        for u in order.tolist():
            if common[u]:
                members += 1
                common &= conflict[u]
                common[u] = False
        best = max(best, members)
    return best


def color(images: Sequence[int], windows: Sequence[Window | None]) -> tuple[list[list[int]], int]:
    """Rounds of target indices, round r holding each image's r-th group, a group's windows pairwise
    disjoint (few groups: DSatur; an unbounded target is a group of its own); and a lower bound on the
    rounds any exact grouping needs (the largest set of targets of one image found all meeting)."""
    groups: dict[int, list[list[int]]] = {}
    bound = 0
    for image in dict.fromkeys(images):
        own = [i for i, im in enumerate(images) if im == image]
        if all(windows[i] is None for i in own):
            groups[image], bound = [[i] for i in own], max(bound, len(own))
            continue
        conflict = conflicts([windows[i] for i in own])
        groups[image] = [[own[k] for k in g] for g in _dsatur(conflict)]
        bound = max(bound, clique(conflict))
    depth = max((len(g) for g in groups.values()), default=0)
    return [[i for image in groups for i in (groups[image][r] if r < len(groups[image]) else [])]
            for r in range(depth)], bound


def masks(windows: Sequence[Window | None], name: str, shape: tuple[int, int], device: torch.device
          ) -> Tensor | None:
    """``(T, 1, h, w)`` masks of the targets' windows at layer ``name`` (all ones where unbounded);
    None when no target is bounded."""
    if all(w is None for w in windows):
        return None
    out = torch.zeros(len(windows), 1, *shape, dtype=torch.bool, device=device)
    for i, w in enumerate(windows):
        if w is None:
            out[i] = True
        elif w.get(name) is not None:
            y0, y1, x0, x1 = w[name]  # type: ignore[misc]
            out[i, :, y0:y1 + 1, x0:x1 + 1] = True
    return out
