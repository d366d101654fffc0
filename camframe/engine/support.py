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
probe that overflows bounds nothing. The probe runs once per adapter anchor
key (a head level, say) from a cell in the middle of its grid; its bounding rectangle at each layer
is translated to every other cell of that grid by the layer's stride ratio, with a ``MARGIN`` of
cells for the rounding of up- and down-sampling. A rectangle that touches a map's border at the
probe cell cannot be translated safely: that key's targets are never grouped, nor are targets
the adapter neither bounds nor anchors (``footprint`` and ``anchor`` return None).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from camframe.adapters.base import Rect
from camframe.core.capture import grad

__all__ = ["MARGIN", "Rect", "Support", "color"]

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
        self._templates: dict[Hashable, dict[str, tuple[float, float, float, float] | None] | None] = {}

    def windows(self, targets: Sequence[Any], outputs: Any, layer_shapes: Callable[[], dict[str, tuple[int, int]]],
                probe: Callable[[], tuple[Any, dict[str, Tensor]]], score_fn: Callable) -> list[Window | None]:
        """Each target's window per layer (maps of the sizes ``layer_shapes()`` gives), or None: unbounded.
        ``probe`` runs the model on a one-image input of ones and returns its outputs and captured layers."""
        lazy = _Shapes(layer_shapes)  # looked at only where the adapter bounds a target
        found = [_widen(self.adapter.footprint(t, outputs, lazy), lazy) for t in targets]
        anchors = [None if f is not None else self.adapter.anchor(t, outputs) for t, f in zip(targets, found)]
        if all(a is None for a in anchors):
            return found
        shapes = dict(lazy)
        keys = [None if a is None else (a[0], tuple(a[1]), tuple(sorted(shapes.items()))) for a in anchors]
        missing = {k: (t, a[1]) for t, a, k in zip(targets, anchors, keys)
                   if a is not None and k not in self._templates}
        if missing:
            self._probe(missing, shapes, probe, score_fn)
        return [f if k is None or self._templates[k] is None else _place(self._templates[k], a[1], a[2], shapes)
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
                self._templates[key] = None if grads is None else self._template(names, grads, grid, centre, shapes)

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
    out: Window = {}
    for n, r in footprint.items():
        h, w = shapes[n]
        out[n] = None if r is None else (max(r[0] - MARGIN, 0), min(r[1] + MARGIN, h - 1),
                                         max(r[2] - MARGIN, 0), min(r[3] + MARGIN, w - 1))
    return out


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
        y0, x0 = math.floor(cy + rel[0]) - MARGIN, math.floor(cx + rel[2]) - MARGIN
        y1, x1 = math.ceil(cy + rel[1]) + MARGIN, math.ceil(cx + rel[3]) + MARGIN
        out[n] = (max(y0, 0), min(y1, h - 1), max(x0, 0), min(x1, w - 1))
    return out


def _meet(a: Window | None, b: Window | None) -> bool:
    """Whether two targets' windows overlap at some layer (an unbounded one meets every other)."""
    if a is None or b is None:
        return True
    for n, r in a.items():
        s = b.get(n)
        if r is not None and s is not None and r[0] <= s[1] and s[0] <= r[1] and r[2] <= s[3] and s[2] <= r[3]:
            return True
    return False


def color(images: Sequence[int], windows: Sequence[Window | None]) -> list[list[int]]:
    """Rounds of target indices: round r holds each image's r-th group, a group's windows pairwise
    disjoint (greedy colouring in the targets' order); an unbounded target is a group of its own."""
    groups: dict[int, list[list[int]]] = {}
    for i, (image, win) in enumerate(zip(images, windows)):
        own = groups.setdefault(image, [])
        for g in own:
            if win is not None and all(not _meet(win, windows[j]) for j in g):
                g.append(i)
                break
        else:
            own.append([i])
    depth = max((len(g) for g in groups.values()), default=0)
    return [[i for image in groups for i in (groups[image][r] if r < len(groups[image]) else [])]
            for r in range(depth)]


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
