"""Guided backpropagation through any element-wise activation.

Rule: an activation ``y = f(x)`` passes back ``ReLU(f'(x)) * ReLU(dL/dy)``. For ReLU this is
Springenberg et al.'s rule exactly (``f'(x) = 1[x > 0]``); for smooth activations (SiLU, GELU,
Mish, Hardswish...) it keeps the local slope where it is positive and lets only positive
gradient signals through, so the map stays a guided one.

Activations are caught two ways, so the model itself is never edited: torch functions
(``F.relu``, ``torch.relu``, ``Tensor.relu_``, ``F.silu``..., which every built-in activation
module calls) through a ``TorchFunctionMode``; module types (a user's own activation class)
through forward hooks that are removed when the pass ends.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["BUILTIN_RULES", "Switch", "guided"]

# In-place variants are computed out of place: the caller gets the guided result back.
_INPLACE: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.relu_: torch.relu,
    torch.Tensor.relu_: torch.relu,
    F.relu_: F.relu,
    F.leaky_relu_: F.leaky_relu,
    F.hardtanh_: F.hardtanh,
    F.elu_: F.elu,
}

BUILTIN_RULES: list[Any] = [
    F.relu, torch.relu, torch.Tensor.relu, F.relu6, F.hardtanh, F.leaky_relu, F.elu,
    F.silu, F.gelu, F.hardswish, F.mish, F.prelu, F.celu, F.selu, *_INPLACE,
]


class Switch:
    """Whether backward passes follow the guided rule (``on``) or give the true gradient, so one
    forward serves both the class activation maps and guided backprop."""

    def __init__(self, on: bool = True) -> None:
        self.on = on


class _Guided(torch.autograd.Function):
    """``f(x)`` whose backward is ``ReLU(f'(x) * ReLU(grad))``: with ``ReLU(grad) >= 0`` this equals
    ``ReLU(f'(x)) * ReLU(grad)``, one vector-Jacobian product of ``f`` (kept as a small graph) per backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, graph: tuple[Tensor, Tensor, Switch],  # type: ignore[override]
                inplace: bool) -> Tensor:
        ctx.graph = graph  # (leaf, f(leaf), switch): f's own graph at x
        if inplace:  # x takes the result: one node, no copy_ whose zero gradient autograd would add up
            ctx.mark_dirty(x)
            return x.copy_(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        leaf, y, switch = ctx.graph
        if not switch.on:
            return torch.autograd.grad(y, leaf, grad, retain_graph=True)[0], None, None, None
        (vjp,) = torch.autograd.grad(y, leaf, grad.clamp(min=0), retain_graph=True)  # rounds reuse it
        return vjp.clamp_(min=0), None, None, None


def _apply(fn: Callable[[Tensor], Tensor], x: Tensor, switch: Switch, inplace: bool = False) -> Tensor:
    """``fn(x)`` whose backward follows the guided rule while ``switch`` is on; ``inplace``: written into ``x``."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        y = fn(leaf.clone())
    if inplace and x._is_view():  # autograd's view bookkeeping needs the plain copy
        return x.copy_(_Guided.apply(x.clone(), y.detach(), (leaf, y, switch), False))
    return _Guided.apply(x, y.detach(), (leaf, y, switch), inplace)


def _without_inplace(func: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Callable, tuple, dict, bool]:
    """The out-of-place form of a call, and whether the original call worked in place."""
    if func in _INPLACE:
        return _INPLACE[func], args, kwargs, True
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return func, args, kwargs, False
    inplace = bool(bound.arguments.get("inplace", False))
    if "inplace" in bound.arguments:
        bound.arguments["inplace"] = False
    return func, bound.args, bound.kwargs, inplace


class _GuidedMode(TorchFunctionMode):
    def __init__(self, functions: set[Any], switch: Switch) -> None:
        super().__init__()
        self.functions = functions
        self.switch = switch

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self.functions and args and isinstance(args[0], Tensor) and torch.is_grad_enabled():
            func, args, kwargs, inplace = _without_inplace(func, args, kwargs)
            # in place: the result goes into args[0], which the caller may use instead of what is returned
            return _apply(lambda t: func(t, *args[1:], **kwargs), args[0], self.switch, inplace)
        return func(*args, **kwargs)


@contextmanager
def guided(model: nn.Module, rules: list[Any], switch: Switch | None = None) -> Iterator[Switch]:
    """Run ``model`` with every activation named in ``rules`` replaced by its guided version
    (while ``switch``, yielded, is on: the backward passes of the graph built inside decide)."""
    switch = switch or Switch()
    types = tuple(r for r in rules if isinstance(r, type))
    functions = {r for r in rules if not isinstance(r, type)}

    originals: dict[int, Tensor] = {}

    def keep_input(module: nn.Module, inputs: tuple) -> Any:
        # the module gets a copy, so an in-place activation cannot change the tensor we differentiate
        if inputs and isinstance(inputs[0], Tensor):
            originals[id(module)] = inputs[0]
            return (inputs[0].clone(), *inputs[1:])
        return None

    def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
        x = originals.pop(id(module), None)
        if isinstance(output, Tensor) and x is not None:
            return _apply(module.forward, x, switch)
        return output

    handles = []
    for m in model.modules():
        if types and isinstance(m, types):
            # first among the module's hooks: a layer recorded there sees the guided output
            handles += [m.register_forward_pre_hook(keep_input, prepend=True),
                        m.register_forward_hook(hook, prepend=True)]
    try:
        with _GuidedMode(functions, switch):
            yield switch
    finally:
        for h in handles:
            h.remove()

