"""The layers of camframe (docs/architecture.md, .importlinter): imports run one way, no cycle at import time."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import camframe

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(camframe.__file__).parent
LINT = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(root / ".importlinter"), "--no-cache"], capture_output=True,
                          text=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)},
                          timeout=300)


@pytest.fixture(scope="module")
def linter() -> None:
    if not Path(LINT).exists():
        pytest.fail("lint-imports is not installed: pip install import-linter==2.16 (the [test] extra)")


def test_lint_imports_keeps_every_contract(linter):
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kept, 0 broken" in proc.stdout, proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("engine/explainer.py", "from camframe.output.folder import OutputDir", "layers"),  # upward
    ("output/writer.py", "from camframe import cli", "nothing but the entry points imports the CLI"),
    ("cli.py", "import cv2", "no image or picture code of its own"),
    ("core/errors.py", "from camframe.adapters import base", "layers"),  # a cycle: base imports errors
])
def test_lint_imports_fails_on_a_violation(linter, tmp_path, module, line, contract):
    """The same check on a copy with one bad import added: the build must fail, naming the contract."""
    shutil.copytree(PACKAGE, tmp_path / "camframe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    path = tmp_path / "camframe" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert f"{contract}" in proc.stdout and "BROKEN" in proc.stdout, proc.stdout


def module_level_imports(path: Path, name: str) -> set[str]:
    """The camframe modules ``path`` imports when it is imported (not in functions, not for type checkers)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):  # try/if/with at module level
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(getattr(node, field, []) or [])

    visit(ast.parse(path.read_text()).body)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``graph`` (module -> the modules it imports), or None."""
    state: dict[str, int] = {}

    def walk(m: str, trail: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*trail[trail.index(n):], m, n] if n in trail else [m, n]
            if n not in state and (cycle := walk(n, [*trail, m])):
                return cycle
        state[m] = 2
        return None

    return next((c for m in sorted(graph) if m not in state and (c := walk(m, []))), None)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    modules = {".".join(("camframe", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    # a package's __init__ runs before its modules: an import of the package from inside it is no cycle
    graph = {m: {i for i in module_level_imports(p, m) if i in modules and i != m and not m.startswith(i + ".")}
             for m, p in modules.items()}
    assert graph["camframe.engine.explainer"] >= {"camframe.core.aggregate", "camframe.adapters.base"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cli_is_imported_only_by_the_entry_points():
    users = sorted(m for m, p in ((p.stem, p) for p in PACKAGE.rglob("*.py"))
                   if "camframe.cli" in module_level_imports(p, "camframe.x") | _function_imports(p))
    assert users == ["_entry"], users


def _function_imports(path: Path) -> set[str]:
    return {n.module or "" for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)} | \
           {f"{n.module}.{a.name}" for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.ImportFrom) for a in n.names}


def test_plugins_and_examples_use_only_public_modules():
    sources = [p for d in ("plugins", "examples") for p in (ROOT / d).rglob("*.py") if "tests" not in p.parts]
    private = [f"{p.relative_to(ROOT)}:{k}" for p in sources
               for k, line in enumerate(p.read_text().splitlines(), 1) if "camframe._" in line]
    assert not private, private
