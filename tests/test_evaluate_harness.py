"""benchmarks/evaluate.py, the command that regenerates docs/evaluation.md and docs/gallery.md, in its
quick mode: every section of the page is written and the gallery's pictures exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.needs_plugins


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("evaluation")
    page, gallery = out / "evaluation.md", out / "gallery.md"
    page.write_text("# Evaluation\n\nhand-written prose\n\n<!-- results -->\n\nstale results\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "evaluate.py"), "--quick", "--out", str(page),
                           "--gallery", str(gallery)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return page, gallery


def test_quick_run_writes_every_section(quick):
    text = quick[0].read_text()
    assert text.startswith("# Evaluation\n\nhand-written prose\n") and "stale results" not in text
    for heading in ("### Synthetic shapes detector, 1 held-out images", "### Real photos, COCO yolo11n (1 photos",
                    "### MobileNetV2 (ImageNet weights), 1 real photos", "#### Real photos, top-1 class",
                    "#### Real photos, ground-truth class", "#### Two-object composites", "#### Sanity check"):
        assert heading in text, heading
    for column in ("deletion ↓ (blur)", "deletion ↓ (mean)", "insertion ↑ (blur)", "insertion ↑ (mean)",
                   "ρ of the window"):
        assert column in text, column
    # the anchors and the default ran on the same boxes, each with its seconds per image
    for row in ("elementwise · neck · max-common", "yolov8-explainer 0.0.5", "D-RISE (camframe drise, 8 masks"):
        line = next(line for line in text.splitlines() if line.startswith(f"| {row}"))
        assert re.search(r"\| \d+ \(\d+\) \|", line) and re.search(r"\| \d+\.\d{3} \|$", line), line
    assert "Defaults check (`elementwise · neck · max-common`)" in text


def test_quick_run_writes_the_gallery(quick):
    gallery = quick[1]
    text = gallery.read_text()
    pictures = re.findall(r"!\[[^\]]*\]\((img/gallery/[^)]+)\)", text)
    assert "img/gallery/zidane.cam.jpg" in pictures  # the overview map
    assert sum(p.startswith("img/gallery/zidane.box") for p in pictures) >= 2  # per-box maps
    assert any(p.startswith("img/gallery/pair_01_") for p in pictures)  # the classifier composite
    for picture in pictures:
        assert (gallery.parent / picture).stat().st_size > 1000, picture
