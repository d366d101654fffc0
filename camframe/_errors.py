"""The one exception type camframe raises for bad input."""

from __future__ import annotations

__all__ = ["CamframeError"]


class CamframeError(Exception):
    """A problem with the user's input, reported as one clear line."""
