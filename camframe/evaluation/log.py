"""The resume log of ``camframe evaluate``: one JSON record per (configuration, image), keyed by
everything that determines it, so a run resumes where it stopped."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from camframe.core.truth import Truth
from camframe.engine.explainer import Explainer
from camframe.output.journal import digest

if TYPE_CHECKING:
    from camframe.evaluation.harness import Curves

__all__ = ["record_key", "read_log"]


def record_key(ex: Explainer, config: str, model: str, curves: Curves, path: Path, image: str, truth: Truth) -> str:
    """What determines a record: configuration, model, adapter and its options, metric settings,
    image (path and content) and its ground truth."""
    parts = {"config": config, "model": model, "adapter": ex.adapter.name,
             "options": getattr(ex.adapter, "options", {}), "method": ex.method_name, "layers": list(ex.layers),
             "aggregate": ex.aggregate, "normalise": ex.normalise, "smooth": ex.smooth and str(ex.smooth),
             "method_options": ex.method_options, "curves": dataclasses.asdict(curves),
             "path": str(path), "image": image, "truth": [truth.boxes.tolist(), truth.classes],
             "rows": "missed-objects"}  # records that score the missed objects' maps too (older ones are redone)
    return digest(parts)


def _record(line: str) -> dict[str, Any] | None:
    """A log line's record, or None when it is not one this version wrote."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    fields = {"key": str, "config": str, "path": str, "seconds": (int, float), "rows": list}
    ok = isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in fields.items())
    return record if ok else None


def read_log(path: Path) -> dict[str, dict[str, Any]]:
    """Records already in the log, by key. Malformed lines (one cut short by an interruption, one
    from an older version) are dropped from it, with one warning line on stderr."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    kept, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        record = _record(line) if line.strip() else None
        if record is not None:
            done[record["key"]] = record
            kept.append(line + "\n")
        elif line.strip():
            bad.append(str(number))
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        print(f"camframe: warning: {path}: skipped {len(bad)} malformed line(s) ({shown}); they are redone",
              file=sys.stderr)
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        part.write_text("".join(kept))
        os.replace(part, path)  # atomically: an interruption now loses nothing
    return done
