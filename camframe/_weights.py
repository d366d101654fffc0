"""Read a state dict from disk with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ._errors import CamframeError

__all__ = ["load_state_dict"]


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
