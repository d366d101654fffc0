"""The code installs on Python 3.10 and later (``requires-python``), but CI runs Python 3.11 only: vermin
checks statically that camframe, its plugins and the example adapter use no syntax, module, function or
argument newer than the oldest declared Python."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["camframe", "plugins", "examples"]
# vermin cannot see types: ``float.is_integer`` (every Python) is taken for ``int.is_integer`` (3.12),
# ``torch.long`` for Python 2's ``long``
NOT_WHAT_IT_SEEMS = ["int.is_integer", "long"]


def _oldest_python() -> str:
    """requires-python's lower bound, the same in camframe's and every plugin's pyproject.toml."""
    found = set()
    for path in [REPO / "pyproject.toml", *REPO.glob("*/*/pyproject.toml")]:
        spec = tomllib.loads(path.read_text())["project"]["requires-python"]
        found.add(re.fullmatch(r">=(3\.\d+)", spec).group(1))
    assert len(found) == 1, found
    return found.pop()


def _vermin(*paths: str | Path) -> subprocess.CompletedProcess:
    excludes = [arg for name in NOT_WHAT_IT_SEEMS for arg in ("--exclude", name)]
    command = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", f"-t={_oldest_python()}-",
               "--no-tips", "--violations", "--eval-annotations", *excludes, *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_sources_need_no_python_newer_than_declared():
    classifiers = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["classifiers"]
    oldest = _oldest_python()
    assert f"Programming Language :: Python :: {oldest}" in classifiers
    proc = _vermin(*PACKAGES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"Analyzing \d+ files", proc.stdout), proc.stdout  # it looked at the sources


def test_the_check_catches_newer_python(tmp_path):
    """The same check fails on a module and a method that Python 3.10 lacks."""
    newer = tmp_path / "newer.py"
    newer.write_text("import tomllib\n\nasync def f(tasks):\n    async with __import__('asyncio').TaskGroup() as g:\n"
                     "        pass\n")
    proc = _vermin(newer)
    assert proc.returncode != 0 and "tomllib" in proc.stdout, proc.stdout
