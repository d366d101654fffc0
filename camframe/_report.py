"""A static HTML report: thumbnails per image and per box/class, scores, methods, metric table."""

from __future__ import annotations

import html
from typing import Any

__all__ = ["render", "table_html"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:16px;margin:28px 0 8px;word-break:break-all}
table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#eee}.row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px;width:240px}
figure img{width:240px;height:auto;display:block}figcaption{font-size:12px;margin-top:4px}
.meta{color:#666;font-size:12px}
"""


def _figure(src: str, caption: str, kind: str) -> str:
    return (f'<figure class="{kind}"><a href="{html.escape(src)}"><img class="thumb" src="{html.escape(src)}" '
            f'alt="{html.escape(caption)}"></a><figcaption>{html.escape(caption)}</figcaption></figure>')


def render(manifest: dict[str, Any], table_html: str = "", title: str = "camframe report") -> str:
    """The page for a ``manifest.json`` (paths relative to the page), with an optional metric table."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='meta'>model <b>{html.escape(str(manifest.get('model', '')))}</b> · adapter "
             f"{html.escape(str(manifest.get('adapter', '')))} · method {html.escape(str(manifest.get('method', '')))}"
             f" · layers {html.escape(', '.join(manifest.get('layers', [])))} · aggregate "
             f"{html.escape(str(manifest.get('aggregate', '')))}</p>"]
    if table_html:
        parts.append(f"<h2>Metrics</h2>{table_html}")
    for entry in manifest.get("images", []):
        parts.append(f"<h2>{html.escape(entry['path'])}</h2><div class='row'>")
        if entry.get("overview"):
            n = len(entry.get("detections", []))
            parts.append(_figure(entry["overview"], f"{n} detection(s)", "overview"))
        detections = entry.get("detections", [])
        for e in entry["explanations"]:
            box = e.get("box")
            where = f"box {box} ({detections[box]['score']:.2f}): " if box is not None and box < len(detections) else ""
            label = f"{where}{e['class_name']} · target {e['score']:.3f} · {e['method']} ({e['aggregate']})"
            parts.append(_figure(e["files"]["cam"], label, "explanation"))
        parts.append("</div>")
    parts.append("<script>addEventListener('load',()=>{document.body.dataset.loaded="
                 "[...document.images].filter(i=>i.naturalWidth>0).length})</script></body></html>\n")
    return "".join(parts)


def table_html(markdown: str) -> str:
    """An HTML table from the Markdown summary produced by ``camframe evaluate``."""
    lines = [ln for ln in markdown.strip().splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head, body = rows[0], rows[2:]
    cell = lambda c: html.escape(c.replace("**", ""))  # noqa: E731
    out = ["<table><tr>" + "".join(f"<th>{cell(c)}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{'<b>' + cell(c) + '</b>' if c.startswith('**') else cell(c)}</td>"
                             for c in r) + "</tr>" for r in body]
    return "".join(out) + "</table>"
