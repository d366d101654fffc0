"""The README's quick start: ``make demo`` runs ``scripts/demo.py``, which must work offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.needs_plugins
def test_demo_explains_every_model(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    counts = {}
    for name in ("mobilenet_v2", "shapes_yolo", "yolo11n"):
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        counts[name] = sum(len(e["explanations"]) for e in manifest["images"])
        for entry in manifest["images"]:
            for e in entry["explanations"]:
                assert all((tmp_path / name / f).is_file() for f in e["files"].values())
    assert counts["mobilenet_v2"] == 4
    assert counts["shapes_yolo"] >= 8
    # the official COCO model finds the bus and the people on bus.jpg, the two men and a tie on zidane.jpg
    assert counts["yolo11n"] >= 8
    assert (tmp_path / "yolo11n" / "index.html").is_file()
