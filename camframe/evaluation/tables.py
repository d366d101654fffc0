"""The tables of ``camframe evaluate``: per-configuration summaries as Markdown and CSV."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence

from camframe import metrics

__all__ = ["LOCALISATION", "MISSED", "summarise", "table_markdown", "table_csv"]

LOCALISATION = ("pointing", "ebpg", "discrimination")
MISSED = ("pointing_missed", "ebpg_missed")  # the missed objects' maps (their candidates'), on those objects
_LOWER_IS_BETTER = ("discrimination", "deletion")
_HEADS = {"pointing": "pointing ↑", "ebpg": "EBPG ↑", "discrimination": "discrimination ↓",
          "deletion": "deletion ↓", "insertion": "insertion ↑"}


def _metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics present: localisation, then ``deletion_<fill>``/``insertion_<fill>`` per fill."""
    curves = dict.fromkeys(k for row in rows for k in row if k.startswith(("deletion_", "insertion_")))
    missed = [m for m in MISSED if any(m in row for row in rows)]
    return [*LOCALISATION, *curves, *missed]


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: each metric's mean and 95 % interval, targets, matched share, s/image."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_config.setdefault(r["config"], []).append(r)
    names = _metrics([row for r in records for row in r["rows"]])
    table = []
    for key, recs in by_config.items():
        every = [row for r in recs for row in r["rows"]]
        rows = [row for row in every if row.get("outcome") != "fn"]  # the missed objects' rows: their own metrics
        matched = [row for row in rows if row.get("matched")]
        entry: dict[str, Any] = {"config": key, "images": len(recs), "targets": len(rows), "matched": len(matched),
                                 "seconds": sum(r["seconds"] for r in recs) / len(recs), "metrics": names}
        for m in names:
            values = [row[m] for row in (every if m in MISSED else matched) if row.get(m) is not None]
            bounds = (0.0, 1.0) if m in LOCALISATION + MISSED else None  # shares and hits; the curves' AUCs may pass 1
            entry[m] = metrics.mean_ci(values, bounds=bounds) if values else (math.nan, math.nan, math.nan)
        table.append(entry)
    return table


def _fmt(ci: tuple[float, float, float]) -> str:
    """``mean ± half-width``, or ``mean (low–high)`` where the interval is not symmetric (cut at 0 or 1)."""
    mean, low, high = ci
    if math.isnan(mean):
        return "–"
    if math.isclose(mean - low, high - mean, abs_tol=5e-4):
        return f"{mean:.3f} ± {(high - low) / 2:.3f}"
    return f"{mean:.3f} ({low:.3f}–{high:.3f})"


def _head(metric: str) -> str:
    kind, _, fill = metric.partition("_")
    return _HEADS[kind] + (f" ({fill})" if fill else "")


def table_markdown(table: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (best value of each metric in bold)."""
    names = table[0]["metrics"] if table else list(LOCALISATION)
    best = {}
    for m in names:
        vals = [e[m][0] for e in table if not math.isnan(e[m][0])]
        if vals:
            best[m] = min(vals) if m.startswith(_LOWER_IS_BETTER) else max(vals)
    head = ["method · layers · aggregate", "targets (matched)", *map(_head, names), "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = [e["config"].replace(" | ", " · "), f"{e['targets']} ({e['matched']})"]
        for m in names:
            text = _fmt(e[m])
            cells.append(f"**{text}**" if m in best and e[m][0] == best[m] else text)
        cells.append(f"{e['seconds']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(table: Sequence[dict[str, Any]]) -> str:
    """The summary as CSV: mean, low and high of each metric (``deletion_blur_mean``...)."""
    names = table[0]["metrics"] if table else list(LOCALISATION)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "layers", "aggregate", "smooth", "images", "targets", "matched", "seconds_per_image",
                     *[f"{m}_{s}" for m in names for s in ("mean", "low", "high")]])
    for e in table:
        writer.writerow([*(e["config"].split(" | ") + ["none"])[:4], e["images"], e["targets"], e["matched"],
                         f"{e['seconds']:.4f}", *[f"{v:.4f}" for m in names for v in e[m]]])
    return buf.getvalue()
