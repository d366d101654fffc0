"""Hook specifications: what a camframe plugin can provide."""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("camframe")
hookimpl = pluggy.HookimplMarker("camframe")


@hookspec
def camframe_adapters() -> list[Any]:
    """Return the adapter instances this plugin provides."""


@hookspec
def camframe_methods() -> dict[str, Callable[..., Any]]:
    """Return weighting methods by name, each made with ``camframe.method``."""


@hookspec
def camframe_guided_rules() -> list[Any]:
    """Return activation functions or module types to replace by guided versions."""


@hookspec(firstresult=True)
def camframe_load_model(spec: str, weights: str | None, device: str, unsafe_load: bool) -> Any:
    """Load the model ``spec`` names (running no code from a file unless ``unsafe_load``), or return None."""
