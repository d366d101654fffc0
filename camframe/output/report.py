"""A static HTML report: thumbnails per image and per box/class (with ground truth: grouped as correct, false
alarm and missed), scores, methods, metric table.

The page is safe whatever the file names: every ``href``/``src`` is a ``./``-prefixed URL with the
name's original bytes percent-encoded (so it can never be a ``javascript:`` URL and ``#``, ``?``,
``%`` or newlines stay part of the path), all text is escaped with undecodable bytes shown as
U+FFFD, and a Content-Security-Policy forbids every script: the page runs none.
"""

from __future__ import annotations

import html
import os
import re
from typing import Any
from urllib.parse import quote

__all__ = ["CSP", "render", "table_html"]

CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:16px;margin:28px 0 8px;word-break:break-all;white-space:pre-wrap}
table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#eee}.row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px;width:240px}
figure img{width:240px;height:auto;display:block}figcaption{font-size:12px;margin-top:4px}
.meta{color:#666;font-size:12px}.unsupported{border:2px dashed #c00}.unsupported figcaption{color:#c00}
"""

_GROUPS = (("tp", "correct"), ("fp", "false alarm"), ("fn", "missed"), (None, "other targets"))

_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: object) -> str:
    """``value`` as escaped HTML text; a byte the file system could not decode shows as U+FFFD."""
    return html.escape(_SURROGATE.sub("\ufffd", str(value)))


def _url(name: str) -> str:
    """The page-relative URL of output file ``name``: ``./`` and its original bytes, percent-encoded."""
    return "./" + quote(os.fsencode(name), safe="/")


def _figure(name: str, caption: str, kind: str) -> str:
    url = _url(name)
    return (f'<figure class="{kind}"><a href="{url}"><img class="thumb" src="{url}" alt="{_text(caption)}"></a>'
            f"<figcaption>{_text(caption)}</figcaption></figure>")


def _caption(e: dict[str, Any], detections: list[dict[str, Any]]) -> str:
    box = e.get("box_index")
    where = "missed object: " if e.get("outcome") == "fn" else "your box: " if "user_box_index" in e else ""
    if box is not None and box < len(detections):
        det = detections[box]
        where = f"box {box} ({det['class_name']} {det['detection_score']:.2f}): "
    score = e.get("target_score")
    target = f"{e.get('target_score_kind', 'target')} {score:.3f}" if score is not None else "no target score"
    mark = " · NOT SUPPORTED by the model" if e.get("supported") is False else ""
    versus = f" minus {e['contrast_class_name']}" if "contrast_class_name" in e else ""
    return f"{where}{e['class_name']}{versus} · {target}{mark} · {e['method']} ({e['aggregate']})"


def _head(manifest: dict[str, Any], title: str) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{_text(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{_text(title)}</h1>"
            f"<p class='meta'>model <b>{_text(manifest.get('model', ''))}</b> · adapter "
            f"{_text(manifest.get('adapter', ''))} · method {_text(manifest.get('method', ''))}"
            f" · layers {_text(', '.join(manifest.get('layers', [])))} · aggregate "
            f"{_text(manifest.get('aggregate', ''))} · device {_text(manifest.get('device', ''))}</p>")


def render(manifest: dict[str, Any], table_html: str = "", title: str = "camframe report") -> str:
    """The page for a ``manifest.json`` (paths relative to the page), with an optional metric table."""
    parts = [_head(manifest, title)]
    if table_html:
        parts.append(f"<h2>Metrics</h2>{table_html}")
    for entry in manifest.get("images", []):
        parts.append(f"<h2>{_text(entry['path'])}</h2><div class='row'>")
        detections = entry.get("detections", [])
        if entry.get("overview"):
            parts.append(_figure(entry["overview"], f"{len(detections)} detection(s)", "overview"))
        overviews = [entry["overview_map"]] if entry.get("overview_map") else []  # then one per class
        parts += [_figure(o["files"]["cam"], f"{o.get('class_name', 'all boxes')}: max of {len(o['box_indices'])} box "
                          "map(s)", "overview-map") for o in overviews + entry.get("class_overview_maps", [])]
        figures = [(e, _figure(e["files"]["cam"], _caption(e, detections),
                               "explanation" if e.get("supported") is not False else "explanation unsupported"))
                   for e in entry["explanations"]]
        if "ground_truth" not in entry:
            parts += [f for _, f in figures]
        for outcome, heading in _GROUPS if "ground_truth" in entry else ():  # with labels: grouped by outcome
            shown = [f for e, f in figures if e.get("outcome") == outcome]
            if shown:
                parts.append(f"</div><h3>{heading} ({len(shown)})</h3><div class='row'>" + "".join(shown))
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)


def table_html(markdown: str) -> str:
    """An HTML table from the Markdown summary produced by ``camframe evaluate``."""
    lines = [ln for ln in markdown.strip().splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head, body = rows[0], rows[2:]
    cell = lambda c: _text(c.replace("**", ""))  # noqa: E731
    out = ["<table><tr>" + "".join(f"<th>{cell(c)}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{'<b>' + cell(c) + '</b>' if c.startswith('**') else cell(c)}</td>"
                             for c in r) + "</tr>" for r in body]
    return "".join(out) + "</table>"
