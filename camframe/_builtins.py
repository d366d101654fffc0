"""camframe's own plugin: the generic classifier adapter, weighting methods and guided rules."""

from __future__ import annotations

import importlib
from typing import Any

from ._adapter import Adapter, ClassifierAdapter
from ._guided import BUILTIN_RULES
from ._hookspecs import hookimpl
from ._methods import BUILTIN_METHODS


class GenericAdapter(ClassifierAdapter):
    """Any module returning ``(B, classes)`` logits; the fallback when nothing else matches."""

    name = "generic"
    priority = -100

    def matches(self, model: Any) -> bool:
        import torch

        return isinstance(model, torch.nn.Module)


@hookimpl
def camframe_adapters() -> list[Adapter]:
    return [GenericAdapter()]


@hookimpl
def camframe_methods() -> dict[str, Any]:
    return dict(BUILTIN_METHODS)


@hookimpl
def camframe_guided_rules() -> list[Any]:
    return list(BUILTIN_RULES)


@hookimpl(trylast=True)
def camframe_load_model(spec: str, weights: str | None, device: str) -> Any:
    """``package.module:factory`` calls that factory; ``--weights`` loads a state dict into it."""
    if ":" not in spec:
        return None
    from ._errors import CamframeError

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CamframeError(f"cannot import model factory {spec!r}: {exc}") from None
    model = factory()
    if weights:
        from ._weights import load_state_dict

        model.load_state_dict(load_state_dict(weights))
    return model.to(device)
