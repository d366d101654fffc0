"""What the benchmark scripts share: timing, the YOLO model as pytorch-grad-cam sees it, doc sections."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Logits(torch.nn.Module):
    """A YOLO DetectionModel returning one tensor, its class logits ``(B, nc, anchors)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[1]["scores"]


def write_section(page: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- name -->`` and ``<!-- /name -->`` in ``page`` (appended if absent)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    body = page.read_text() if page.is_file() else ""
    block = f"{start}\n\n{text.strip()}\n\n{end}"
    if start in body and end in body:
        body = body[:body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    page.write_text(body)
