"""The ``camframe`` command's entry point. It imports nothing heavy itself: Ctrl-C or SIGTERM while torch and
the plugins import (seconds) ends the command as at any other time, with one line and 130 or 143."""

from __future__ import annotations

import signal
import sys

from camframe.core.errors import Terminated, terminate

__all__ = ["main", "Terminated", "terminate"]


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
