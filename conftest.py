"""Every ``manifest.json`` the test suite writes is validated against the shipped schema (camframe-manifest/1):
after each test, those under its ``tmp_path``; at the end of the session, every one under pytest's base
temporary folder (``tmp_path_factory`` folders too). One that fails fails its test, or the session.

A ``manifest.json`` counts as camframe's when it is a JSON object with ``images`` or ``schema`` (the output
folder's own tests write stand-ins of other content); a test marked ``legacy_manifest`` writes an older
camframe's manifest on purpose, and its ``tmp_path`` is left out."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import camframe

_checked: set[Path] = set()  # validated after their test, or left out by its marker


def _validate(path: Path) -> str | None:
    """None, or why ``path`` is not a valid manifest."""
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and not {"images", "schema"} & set(data):
            return None  # not a camframe manifest: a stand-in of the output folder's tests
        jsonschema.validate(data, camframe.manifest_schema())
    except (ValueError, jsonschema.ValidationError) as exc:
        return f"{path}: {str(exc).splitlines()[0]}"
    return None


def _manifests(root: Path) -> list[Path]:
    return [p for p in root.rglob("manifest.json") if p.is_file() and ".camframe" not in p.parts]


@pytest.fixture(autouse=True)
def _manifests_valid(request: pytest.FixtureRequest, tmp_path: Path):
    yield
    found = _manifests(tmp_path)
    _checked.update(found)
    if request.node.get_closest_marker("legacy_manifest"):
        return
    errors = [e for e in map(_validate, found) if e]
    assert not errors, "manifest.json not valid against camframe-manifest/1:\n" + "\n".join(errors)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None)
    if base is None:
        return
    found = _manifests(Path(base))
    errors = [e for e in map(_validate, set(found) - _checked) if e]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"camframe: {len(found)} manifest.json file(s) validated against camframe-manifest/1")
    if errors:
        if reporter is not None:
            reporter.write_line("manifest.json not valid against camframe-manifest/1:\n" + "\n".join(errors), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
