"""The documentation keeps up with the code (in the style of datasette's documentation tests).

* every hook specification in ``camframe/_hookspecs.py`` has a section in ``docs/hooks.md`` whose
  ``def camframe_...(...)`` signature has the spec's parameters, in order, and has a test of its
  own somewhere else under ``tests/``;
* every public name of ``camframe`` and ``camframe.metrics``, every built-in weighting method,
  every ``Adapter`` method and every YOLO option is documented;
* ``mkdocs build --strict`` succeeds, and the CLI page is generated from the real parser.

The build test is skipped only where mkdocs is not installed and ``CAMFRAME_REQUIRE_DOCS`` is
unset; CI sets it, so there a missing mkdocs fails.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import camframe
from camframe import metrics
from camframe.plugins import hookspecs as _hookspecs
from camframe.adapters.base import Adapter
from camframe.cli import build_parser
from camframe.methods.weightings import BUILTIN_METHODS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TESTS = Path(__file__).resolve().parent

_MARKER = f"{_hookspecs.hookspec.project_name}_spec"
HOOKS = {name: fn for name, fn in vars(_hookspecs).items()
         if name.startswith("camframe_") and inspect.isfunction(fn) and hasattr(fn, _MARKER)}


def read(page: str) -> str:
    return (DOCS / page).read_text(encoding="utf-8")


def sections(markdown: str) -> dict[str, str]:
    """Heading line -> the text up to the next heading of the same or a higher level."""
    lines = markdown.splitlines()
    heads = []
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) ", line)):
            heads.append((i, len(m.group(1))))
    out = {}
    for n, (i, level) in enumerate(heads):
        end = next((j for j, lv in heads[n + 1:] if lv <= level), len(lines))
        out[lines[i]] = "\n".join(lines[i + 1:end])
    return out


def documented_params(section: str, name: str) -> list[str] | None:
    """Parameter names of ``def name(...)`` in the section's Python code blocks, or None."""
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        match = re.search(rf"^def {name}\(.*?\)\s*(->[^\n]*?)?:?\s*$", block, flags=re.S | re.M)
        if match:
            source = match.group(0).rstrip().rstrip(":") + ": ..."
            fn = ast.parse(source).body[0]
            assert isinstance(fn, ast.FunctionDef)
            a = fn.args
            return [p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]]
    return None


# --------------------------------------------------------------------------- hooks
def test_hookspecs_are_discovered():
    assert {"camframe_adapters", "camframe_methods", "camframe_guided_rules", "camframe_load_model"} <= set(HOOKS)


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_hook_is_documented_with_its_signature(hook):
    found = {head: body for head, body in sections(read("hooks.md")).items()
             if re.search(rf"\b{hook}\b", head)}
    assert found, f"docs/hooks.md has no section (heading) for {hook}"
    (head, body), = found.items()
    params = documented_params(body, hook)
    assert params is not None, f"section {head!r} of docs/hooks.md shows no `def {hook}(...)` in a python code block"
    real = list(inspect.signature(HOOKS[hook]).parameters)
    assert params == real, f"docs/hooks.md documents {hook}({', '.join(params)}), the spec is {hook}({', '.join(real)})"
    for p in real:
        assert f"`{p}`" in body, f"argument {p!r} of {hook} is not described in its section"


def _hook_marks(path: Path) -> dict[str, list[str]]:
    """Test function name -> the hooks its ``@pytest.mark.hook(...)`` names."""
    marks: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "pytest.mark.hook":
                    marks.setdefault(node.name, []).extend(a.value for a in deco.args if isinstance(a, ast.Constant))
    return marks


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_hook_has_a_test_of_its_own(hook):
    """A test marked ``@pytest.mark.hook(name)``, which conftest.py fails unless it calls the hook through the
    plugin manager with a plugin's implementation (a name merely mentioned in a test file does not count)."""
    tests = [f"{p.name}::{name}" for p in sorted(TESTS.rglob("test_*.py")) for name, hooks in _hook_marks(p).items()
             if hook in hooks]
    assert tests, f"no test under tests/ is marked @pytest.mark.hook({hook!r})"


# --------------------------------------------------------------------------- API, methods, adapters
@pytest.mark.parametrize("name", camframe.__all__)
def test_public_name_has_reference(name):
    assert re.search(rf"^::: camframe\.{re.escape(name)}\s*$", read("python-api.md"), flags=re.M), \
        f"docs/python-api.md has no `::: camframe.{name}`"


@pytest.mark.parametrize("name", metrics.__all__)
def test_metric_has_reference(name):
    text = read("python-api.md")
    assert "::: camframe.metrics" in text
    block = text[text.index("::: camframe.metrics"):]
    assert re.search(rf"^\s+- {name}\s*$", block, flags=re.M), \
        f"camframe.metrics.{name} is missing from the members of `::: camframe.metrics` in docs/python-api.md"


@pytest.mark.parametrize("name", sorted(BUILTIN_METHODS))
def test_builtin_method_has_formula(name):
    (body,) = [b for h, b in sections(read("concepts.md")).items() if h.startswith("## Methods")]
    match = re.search(rf"^### `{re.escape(name)}`.*?\n```text\n(.+?)```", body, flags=re.M | re.S)
    assert match and match.group(1).strip(), f"docs/concepts.md#methods has no formula for {name!r}"


ADAPTER_METHODS = sorted(n for n, v in vars(Adapter).items() if inspect.isfunction(v) and not n.startswith("_"))


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_adapter_method_is_in_the_guide(name):
    assert re.search(rf"^#+ .*`{name}\(", read("writing-an-adapter.md"), flags=re.M), \
        f"docs/writing-an-adapter.md has no section for Adapter.{name}()"


def test_yolo_options_are_documented():
    adapter = pytest.importorskip("camframe_ultralytics._adapter")
    text = read("yolo.md")
    for option in adapter._DEFAULTS:
        assert re.search(rf"^\| `{option}` \|", text, flags=re.M), f"docs/yolo.md does not document option {option!r}"
    for side in adapter.SIDES:
        assert f"`{side}`" in text


def test_documented_boolean_options_parse_as_booleans():
    from camframe.cli import _option

    adapter = pytest.importorskip("camframe_ultralytics._adapter").YOLOAdapter()
    assert "-O nms=false" in read("yolo.md")
    adapter.configure(**dict([_option("nms=false"), _option("agnostic=true")]))
    assert adapter.options["nms"] is False and adapter.options["agnostic"] is True


@pytest.mark.parametrize("page", ["evaluation.md", "benchmarks.md"])
def test_results_marker(page):
    assert "<!-- results -->" in read(page)


# --------------------------------------------------------------------------- the site
def _mkdocs_available() -> bool:
    return importlib.util.find_spec("mkdocs") is not None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not _mkdocs_available():
        if os.environ.get("CAMFRAME_REQUIRE_DOCS"):
            pytest.fail("CAMFRAME_REQUIRE_DOCS is set but mkdocs is not installed "
                        "(pip install mkdocs mkdocs-material \"mkdocstrings[python]\")")
        pytest.skip("mkdocs is not installed (set CAMFRAME_REQUIRE_DOCS=1 to make this a failure)")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_mkdocs_build_strict(site):
    for page in ["index.html", "concepts/index.html", "python-api/index.html", "cli/index.html",
                 "yolo/index.html", "hooks/index.html", "writing-an-adapter/index.html",
                 "evaluation/index.html", "benchmarks/index.html"]:
        assert (site / page).is_file(), page


def _text(path: Path) -> str:
    """The page's visible text, whitespace collapsed."""
    raw = re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8"))
    return " ".join(html.unescape(raw).split())


def _subparsers():
    import argparse

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_cli_page_is_generated_from_the_parser(site):
    source = read("cli.md")
    assert "<!-- cli-reference -->" in source
    page = _text(site / "cli" / "index.html")
    subparsers = _subparsers()
    assert set(subparsers) >= {"explain", "evaluate", "layers", "plugins"}
    for name, sub in subparsers.items():
        usage = " ".join(sub.format_usage().split())
        assert usage not in " ".join(source.split()), f"cli.md hand-writes the usage of {name}"
        assert usage in page, f"the CLI page lacks the usage of `camframe {name}` from build_parser()"
        for action in sub._actions:
            for option in action.option_strings:
                assert option in page, f"the CLI page lacks {option} of `camframe {name}`"
            if action.help and action.help != "show this help message and exit":
                assert " ".join(action.help.split()) in page, f"the CLI page lacks the help of {action.dest}"


def test_api_reference_is_rendered(site):
    page = _text(site / "python-api" / "index.html")
    for name in camframe.__all__:
        assert f"camframe.{name}" in page
    assert "Explain a model's targets with class activation maps" in page  # Explainer's docstring
    for rendered in ("targets per backward pass", "The Result, one row per target",  # Args, Returns
                     "aggregated maps in [0, 1]", "The manifest, as written"):  # Result's Attributes, write's Returns
        assert rendered in page, rendered
