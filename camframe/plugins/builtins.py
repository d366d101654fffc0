"""camframe's own plugin: the generic classifier adapter, weighting methods and guided rules."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from camframe.adapters.base import Adapter, ClassifierAdapter
from camframe.methods.drise import DRISE
from camframe.core.errors import CamframeError
from camframe.methods.guided import BUILTIN_RULES
from camframe.plugins.hookspecs import hookimpl
from camframe.methods.weightings import BUILTIN_METHODS
from camframe.adapters.weights import load_weights


class GenericAdapter(ClassifierAdapter):
    """Any module returning ``(B, classes)`` logits; the fallback when nothing else matches."""

    name = "generic"
    priority = -100

    def matches(self, model: Any) -> bool:
        return isinstance(model, torch.nn.Module)


@hookimpl
def camframe_adapters() -> list[Adapter]:
    return [GenericAdapter()]


@hookimpl
def camframe_methods() -> dict[str, Any]:
    return {**BUILTIN_METHODS, "drise": DRISE}


@hookimpl
def camframe_guided_rules() -> list[Any]:
    return list(BUILTIN_RULES)


@hookimpl(trylast=True)
def camframe_load_model(spec: str, weights: str | None, device: str) -> Any:
    """``package.module:factory`` calls that factory; ``--weights`` loads a state dict into it."""
    if ":" not in spec:
        return None
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CamframeError(f"cannot import model factory {spec!r}: {exc}") from None
    model = _call_factory(spec, factory)
    if weights:
        load_weights(model, weights, spec)
    return model.to(device)


def _call_factory(spec: str, factory: Any) -> torch.nn.Module:
    """``factory()``, which must be a ``torch.nn.Module``."""
    if not callable(factory):
        raise CamframeError(f"{spec!r} is not a model factory: not callable")
    try:
        model = factory()
    except TypeError as exc:
        raise CamframeError(f"{spec!r} is not a model factory: calling it with no arguments failed ({exc})"
                            .splitlines()[0]) from None
    if not isinstance(model, torch.nn.Module):
        raise CamframeError(f"{spec!r} is not a model factory: it returned {type(model).__name__}, "
                            "not a torch.nn.Module")
    return model
