"""Capture the activations of target layers, keyed by layer, for ``torch.autograd.grad``."""

from __future__ import annotations

import copy
import difflib
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from camframe.core.errors import CamframeError

__all__ = ["Capture", "grad", "resolve_layers"]


def resolve_layers(model: nn.Module, layers: Iterable[str | nn.Module]) -> dict[str, nn.Module]:
    """Map each layer (a dotted name or a submodule) to its name and module."""
    named = dict(model.named_modules())
    names = {id(m): n for n, m in named.items()}
    resolved: dict[str, nn.Module] = {}
    for layer in layers:
        if isinstance(layer, nn.Module):
            if id(layer) not in names:
                raise CamframeError(f"layer {type(layer).__name__} is not a submodule of the model")
            resolved[names[id(layer)] or "<model>"] = layer
        elif layer in named and layer:
            resolved[layer] = named[layer]
        else:
            close = difflib.get_close_matches(str(layer), [n for n in named if n], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `camframe layers` lists them"
            raise CamframeError(f"unknown layer {layer!r}{hint}")
    if not resolved:
        raise CamframeError("no target layer given")
    return resolved


def _first_tensor(value: Any) -> tuple[Tensor | None, Callable[[Tensor], Any]]:
    """The first floating tensor in a (nested) output, and how to put a replacement back."""
    if isinstance(value, Tensor):
        return (value, lambda t: t) if value.is_floating_point() else (None, lambda t: value)
    items: list[tuple[Any, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return None, lambda t: value
    for key, item in items:
        tensor, put = _first_tensor(item)
        if tensor is not None:
            def rebuild(t: Tensor, key: Any = key, put: Callable = put) -> Any:
                if isinstance(value, dict):  # a copy of its own type: a dict subclass keeps its attributes
                    mapping = copy.copy(value)
                    mapping[key] = put(t)
                    return mapping
                seq = list(value)
                seq[key] = put(t)
                return type(value)(*seq) if hasattr(value, "_fields") else type(value)(seq)
            return tensor, rebuild
    return None, lambda t: value


class Capture:
    """Forward hooks recording each target layer's output as a tensor in the autograd graph.

    A layer's output that does not require grad (frozen weights, an input without grad) becomes a
    leaf that does, so gradients flow from the target down to it and no further. Downstream
    modules get a clone, so an in-place op after the layer (``ReLU(inplace=True)``) cannot alter
    what was recorded. A module called several times per forward is recorded once per call, as
    ``name#0``, ``name#1``...

    Hooks record only while ``recording()`` is active (camframe's own forward); any other forward
    through the hooked model, e.g. the user's own inside ``with Explainer(...)``, passes untouched.
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self._calls: dict[str, list[Tensor]] = defaultdict(list)
        self._handles: list[Any] = []
        self._armed = False

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Arm the hooks for the forward run inside; what was recorded before is dropped."""
        self.reset()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def __enter__(self) -> "Capture":
        try:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            if not self._armed:  # not camframe's forward: nothing to record
                return output
            tensor, rebuild = _first_tensor(output)
            if tensor is None:
                raise CamframeError(f"layer {name!r} returned no floating-point tensor")
            if not tensor.requires_grad:
                tensor = tensor.detach().requires_grad_()
            self._calls[name].append(tensor)
            return rebuild(tensor.clone())

        return hook

    def reset(self) -> None:
        self._calls.clear()

    @property
    def activations(self) -> dict[str, Tensor]:
        """Recorded outputs of the last forward, in the order of ``layers``."""
        out: dict[str, Tensor] = {}
        for name in self.layers:
            calls = self._calls.get(name, [])
            if not calls:
                raise CamframeError(f"layer {name!r} did not run in the forward pass")
            if len(calls) == 1:
                out[name] = calls[0]
            else:
                out.update({f"{name}#{i}": t for i, t in enumerate(calls)})
        return out


def grad(outputs: Tensor, inputs: Sequence[Tensor], grad_outputs: Tensor | None = None,
         **kwargs: Any) -> list[Tensor]:
    """``torch.autograd.grad`` with zeros (of the input's own shape) for an input the outputs do not reach
    (``materialize_grads=True``, which torch before 2.1 lacks)."""
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(inp) if g is None else g for g, inp in zip(grads, inputs)]
