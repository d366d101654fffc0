"""Where the time goes: wall seconds per stage of a run, each stage's own time (a stage inside another
is not counted twice), and counts (targets, backward passes)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["Profile"]


class Profile:
    """Stages' wall seconds and counts, summed over calls; disabled (the default), ``stage`` costs nothing.

    Where the device runs asynchronously (CUDA, MPS), each stage's edges wait for it, so that its work is
    counted in the stage that queued it.
    """

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = False) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._open: list[list[float]] = []  # per open stage: its start and its inner stages' seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as ``name``, less the stages opened inside it."""
        if not self.enabled:
            yield
            return
        self._sync()
        self._open.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            self._sync()
            start, inner = self._open.pop()
            spent = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - inner
            if self._open:
                self._open[-1][1] += spent

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` timed elsewhere to the stage ``name``."""
        if self.enabled:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the count ``name``."""
        if self.enabled:
            self.counts[name] = self.counts.get(name, 0) + n

    def table(self, total: float | None = None) -> str:
        """The stages, largest first, with their share of ``total`` (default: their sum; the rest is "other")."""
        total = sum(self.seconds.values()) if total is None else total
        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        rest = total - sum(self.seconds.values())
        if rest > 0.0005:
            rows.append(("other", rest))
        width = max([len(n) for n, _ in rows] + [5])
        lines = [f"  {n:<{width}}  {s:8.3f} s  {100 * s / total if total else 0:5.1f} %" for n, s in rows]
        lines.append(f"  {'total':<{width}}  {total:8.3f} s")
        if self.counts:
            lines.append("  " + ", ".join(f"{n}: {c}" for n, c in self.counts.items()))
        return "\n".join(lines)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()
