"""The ``camframe`` command's entry point. It imports nothing heavy itself: Ctrl-C or SIGTERM while torch and
the plugins import (seconds) ends the command as at any other time, with one line and 130 or 143."""

from __future__ import annotations

import signal
import sys
from typing import Any

__all__ = ["main", "Terminated", "terminate"]


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (``finally``, ``__exit__``) runs as for Ctrl-C."""


def terminate(signum: int, frame: Any) -> None:
    raise Terminated


def main() -> int:
    """Import the command (``camframe.cli``), then run it (it handles signals itself from then on)."""
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        from camframe.cli import main as command

        return command()
    except KeyboardInterrupt:
        print("camframe: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("camframe: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
