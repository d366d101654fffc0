"""The one exception type camframe raises for bad input."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["CamframeError", "out_of_memory", "Terminated", "terminate", "interrupted"]


class CamframeError(Exception):
    """A problem with the user's input, reported as one clear line."""


def out_of_memory(exc: BaseException) -> str | None:
    """The first line of ``exc`` if it is a failed allocation (Python's ``MemoryError``, torch's
    ``OutOfMemoryError`` or CPU allocator, OpenCV's ``Insufficient memory``), else None."""
    text = (str(exc) or type(exc).__name__).strip().splitlines()[0]
    hints = ("can't allocate memory", "out of memory", "insufficient memory", "failed to allocate")
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or any(h in text.lower()
                                                                                        for h in hints):
        return text
    return None


SMALLER = ("a smaller input size (an adapter option, e.g. imgsz), a smaller --batch-size or a device with more "
           "memory needs less")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (``finally``, ``__exit__``) runs as for Ctrl-C."""


def terminate(signum: int, frame: Any) -> None:
    raise Terminated


def interrupted(exc: BaseException) -> int:
    """The command's exit status for Ctrl-C (130) or SIGTERM (143), its one line printed on stderr."""
    terminated = isinstance(exc, Terminated)
    print(f"camframe: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130
