"""The ``camframe`` command's entry point. It imports nothing heavy itself: Ctrl-C or SIGTERM while torch and
the plugins import (seconds) ends the command as at any other time, with one line and 130 or 143."""

from __future__ import annotations

import signal

from camframe.core.errors import Terminated, interrupted, terminate

__all__ = ["main", "Terminated", "terminate"]


def main() -> int:
    """Import the command (``camframe.cli``), then run it (it handles signals itself from then on)."""
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        from camframe.cli import main as command

        return command()
    except (KeyboardInterrupt, Terminated) as exc:
        return interrupted(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
