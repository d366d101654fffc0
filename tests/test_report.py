"""The HTML report, opened from disk in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CAMFRAME_REQUIRE_BROWSER"),
                                   reason="no chromium here (CI installs it and sets CAMFRAME_REQUIRE_BROWSER)")


def _browser(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None, "chromium is required"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120)


def _explain(tmp: Path, images: dict[str, Path], *extra: str) -> Path:
    out = tmp / "out"
    run = subprocess.run([sys.executable, "-m", "camframe", "explain", str(images["chelsea"]), str(images["bus"]),
                          "--model", "resnet18", "--weights", "random", "--classes", "0,1", "--quiet", "--report",
                          "--out", str(out), *extra], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return out


@needs_browser
def test_report_shows_every_thumbnail_in_chromium(tmp_path, images):
    out = _explain(tmp_path, images)
    page = out / "index.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # opens with no network
    expected = 2 * 2  # two images x two classes
    assert html.count('class="thumb"') == expected
    dom = _browser(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    loaded = re.search(r'data-loaded="(\d+)"', dom.stdout)
    assert loaded and int(loaded.group(1)) == expected, dom.stdout[:500]
    shot = tmp_path / "shot.png"
    run = _browser(page, tmp_path, f"--screenshot={shot}", "--window-size=1100,900")
    assert run.returncode == 0 and shot.is_file(), run.stderr
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.std() > 10  # not a blank page: the heat maps are drawn
    assert (pixels[..., 0] - pixels[..., 2] > 80).mean() > 0.002  # some red (hot) heat-map pixels on screen


def test_report_lists_every_explanation(tmp_path, images):
    out = _explain(tmp_path, images)
    html = (out / "index.html").read_text()
    for name in ("chelsea.tench.cam.jpg", "chelsea.goldfish.cam.jpg", "bus.tench.cam.jpg", "bus.goldfish.cam.jpg"):
        assert f'src="{name}"' in html and (out / name).is_file()
