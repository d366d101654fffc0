"""MkDocs hooks for the camframe docs (configured under ``hooks:`` in mkdocs.yml).

* ``cli.md``: the marker ``<!-- cli-reference -->`` is replaced, at build time, by a reference
  rendered from the real parser, ``camframe.cli.build_parser()``: every subcommand's argparse
  help and a table of its options. The page cannot go stale; a missing marker fails the build.
* ``hooks.md``: every hook specification in ``camframe.plugins.hookspecs`` must have a section with a
  ``def camframe_...(...)`` signature whose parameters match the spec's, name for name and in
  order; otherwise a warning is logged, which ``mkdocs build --strict`` turns into an error.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parent.parent
CLI_MARKER = "<!-- cli-reference -->"
HELP_WIDTH = "96"  # argparse wraps help to $COLUMNS; fixed so the page does not depend on the terminal

log = logging.getLogger("mkdocs.hooks.camframe")


def _import_camframe() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- CLI reference
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every subcommand, in the order they were added."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


def _value(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if action.nargs == 0:
        return "–"
    formatter = parser._get_formatter()
    default = action.dest if not action.option_strings else action.dest.upper()
    return f"`{formatter._format_args(action, default)}`"


def _default(action: argparse.Action) -> str:
    d = action.default
    if d is None or d is argparse.SUPPRESS or d is False or d == []:
        return "–"
    if isinstance(d, (list, tuple)):
        d = " ".join(map(str, d))
    return f"`{d}`"


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| Argument | Value | Default | Description |", "|---|---|---|---|"]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}` (positional)"
        text = formatter._expand_help(action) if action.help else ""
        if action.choices is not None:
            text += " (one of " + ", ".join(f"`{c}`" for c in action.choices) + ")"
        if action.required and action.option_strings:
            text = "**Required.** " + text
        rows.append(f"| {name} | {_value(parser, action)} | {_default(action)} | {_cell(text.strip())} |")
    return rows


def _help_block(parser: argparse.ArgumentParser) -> list[str]:
    return ["```text", parser.format_help().rstrip(), "```"]


def render_cli_reference() -> str:
    """Markdown for the whole CLI, from ``camframe.cli.build_parser()``."""
    _import_camframe()
    from camframe.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        parser = build_parser()
        commands = _subcommands(parser)
        lines = ["## `camframe` {#camframe}", "", *_help_block(parser), "",
                 "| Command | What it does |", "|---|---|"]
        lines += [f"| [`camframe {name}`](#{name}) | {_cell(help_)} |" for name, help_, _ in commands]
        for name, help_, sub in commands:
            lines += ["", f"## `camframe {name}` {{#{name}}}", "", f"{help_[:1].upper()}{help_[1:]}.", "",
                      *_help_block(sub), "", *_options_table(sub)]
        return "\n".join(lines) + "\n"
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


# --------------------------------------------------------------------------- hook reference check
def hookspec_names() -> dict[str, inspect.Signature]:
    """Every hook specification in ``camframe.plugins.hookspecs``: name -> signature."""
    _import_camframe()
    from camframe.plugins import hookspecs as _hookspecs

    marker = f"{_hookspecs.hookspec.project_name}_spec"
    return {name: inspect.signature(fn) for name, fn in vars(_hookspecs).items()
            if name.startswith("camframe_") and callable(fn) and hasattr(fn, marker)}


def documented_signatures(markdown: str) -> dict[str, list[str]]:
    """``def camframe_*(...)`` signatures in the page's code blocks: name -> parameter names."""
    found: dict[str, list[str]] = {}
    for block in re.findall(r"```python\n(.*?)```", markdown, flags=re.S):
        for match in re.finditer(r"^def (camframe_\w+)\(.*?\)\s*(->[^\n]*?)?:?\s*$", block, flags=re.S | re.M):
            try:
                tree = ast.parse(match.group(0).rstrip().rstrip(":") + ": ...")
            except SyntaxError:
                continue
            fn = tree.body[0]
            assert isinstance(fn, ast.FunctionDef)
            args = fn.args
            found.setdefault(fn.name, [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]])
    return found


def _check_hooks_page(markdown: str) -> None:
    documented = documented_signatures(markdown)
    for name, sig in hookspec_names().items():
        if not re.search(rf"^#+ .*\b{name}\b", markdown, flags=re.M):
            log.warning("hooks.md: no section for hook %s", name)
        if name not in documented:
            log.warning("hooks.md: no `def %s(...)` signature in a python code block", name)
        elif documented[name] != list(sig.parameters):
            log.warning("hooks.md: %s is documented with parameters %s, the spec has %s",
                        name, documented[name], list(sig.parameters))


# --------------------------------------------------------------------------- MkDocs entry points
def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    src = page.file.src_uri
    if src == "cli.md":
        if CLI_MARKER not in markdown:
            raise PluginError(f"docs/cli.md lost its {CLI_MARKER} marker: the CLI reference goes there")
        return markdown.replace(CLI_MARKER, render_cli_reference())
    if src == "hooks.md":
        _check_hooks_page(markdown)
    return markdown
