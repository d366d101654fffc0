"""Read a state dict from disk, and load it into a model, with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from camframe.core.errors import CamframeError

__all__ = ["load_state_dict", "load_weights"]


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """A state dict from ``path`` (safely unpickled); a ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CamframeError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CamframeError(f"{path}: cannot read weights ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CamframeError(f"{path}: not a state dict")
    return state


def load_weights(model: nn.Module, path: str | Path, name: str) -> nn.Module:
    """``model`` with the weights file ``path`` loaded; if they do not fit the architecture ``name``,
    an error saying which keys are missing or unexpected and which shapes differ.

    Args:
        model: the architecture, built without weights.
        path: a state dict file (read by torch's weights-only unpickler, or safetensors).
        name: the architecture's name, for the error message.

    Returns:
        ``model`` itself, its weights loaded.

    Raises:
        CamframeError: the file cannot be read or does not fit the architecture.
    """
    state = load_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: model {tuple(expected[k].shape)} vs file {tuple(v.shape)}" for k, v in state.items()
              if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape]
    problems = [_count(items, what) for items, what in
                ((missing, "missing key"), (unexpected, "unexpected key"), (shapes, "shape mismatch"))
                if items]
    if problems:
        raise CamframeError(f"{path}: weights do not fit {name}: {', '.join(problems)}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise CamframeError(f"{path}: weights do not fit {name} ({str(exc).splitlines()[0]})") from None
    return model


def _count(items: list[str], what: str) -> str:
    """E.g. ``3 missing keys (a, b, ...)``: the count and the first two."""
    plural = "es" if what.endswith("h") else "s"
    shown = ", ".join(items[:2]) + (", ..." if len(items) > 2 else "")
    return f"{len(items)} {what}{plural if len(items) > 1 else ''} ({shown})"
