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


def _entry(config: str, deletion: float, insertion: float, half: float = 0.02) -> dict:
    metrics = {m: (v, v - half, v + half) for m, v in (("deletion_blur", deletion), ("deletion_mean", deletion),
                                                      ("insertion_blur", insertion), ("insertion_mean", insertion))}
    return {"config": config, **metrics}


def test_defaults_check_skips_configurations_failing_the_sanity_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _evidence

    default, relu, other = "elementwise | neck | max-common", "elementwise-relu | neck | max-common", "gradcam | neck | max"
    table = [_entry(default, 0.50, 0.70), _entry(relu, 0.40, 0.80), _entry(other, 0.51, 0.69),
             _entry("an anchor", 0.10, 0.95)]
    assert _evidence.challengers(table, default) == [relu]  # the anchor never counts; other is within
    sanity = {default: (0.5, 0.9, 0.49, 0.96, 10), relu: (0.9, 0.9, 0.90, 0.96, 10)}  # relu: only 0.06 below
    text, ok = _evidence.defaults_check(table, default, sanity)
    assert ok and "elementwise-relu · neck · max-common 0.400" in text
    sanity[relu] = (0.5, 0.9, 0.80, 0.96, 10)  # 0.16 below the window: relu counts, and beats the default
    assert not _evidence.defaults_check(table, default, sanity)[1]
    sanity[default] = (0.9, 0.9, 0.90, 0.96, 10)  # the default itself not clearly below its window
    assert not _evidence.defaults_check(table[:1], default, sanity)[1]
    smoothed = _entry(default + " | tta", 0.40, 0.80)  # a smoothing is an option on top, not a rival
    sanity[default] = (0.5, 0.9, 0.49, 0.96, 10)
    sanity[relu] = (0.9, 0.9, 0.90, 0.96, 10)
    assert _evidence.challengers(table + [smoothed], default) == [relu]
    assert _evidence.defaults_check(table + [smoothed], default, sanity)[1]


def test_paired_differences_pair_the_same_boxes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _evidence

    def record(key: str, values: list[float | None]) -> dict:
        return {"config": key, "rows": [{"target": t, "matched": v is not None, "ebpg": v}
                                        for t, v in enumerate(values)]}

    # image 0: boxes 0 and 1 matched; image 1: box 0 unmatched, box 1 matched (missing from 'b' there)
    records = [record("a", [0.5, 0.7]), record("a", [None, 0.2]), record("b", [0.4, 0.5]), record("b", [0.9, None])]
    mean, low, high, n = _evidence.paired(records, "a", "b", ["ebpg"])["ebpg"]
    assert n == 2 and abs(mean - 0.15) < 1e-9 and low < mean < high  # (0.1 + 0.2) / 2, the third box unpaired
    assert _evidence.paired(records, "a", "a", ["ebpg"])["ebpg"][:3] == (0.0, 0.0, 0.0)


def test_layers_benchmark_writes_its_section(tmp_path):
    page = tmp_path / "evaluation.md"
    page.write_text("# Evaluation\n\nprose\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "layers.py"), "--images", "1", "--photos", "1",
                           "--steps", "1", "--out", str(page)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = page.read_text()
    assert text.startswith("# Evaluation\n\nprose\n") and "<!-- neck-layers -->" in text
    for heading in ("#### Synthetic shapes detector, 1 held-out images", "#### Real photos, COCO yolo11n (1 photos)",
                    "#### Real photos, COCO yolo11n-seg (1 photos)"):
        assert heading in text, heading
    rows = [line for line in text.splitlines() if line.startswith("| head inputs + top-down blocks · max-common")]
    cell = r"\d\.\d{3} \((\*\*)?[+-]\d\.\d{3} ± \d\.\d{3}(\*\* (better|worse))?\)"  # mean (paired difference)
    assert len(rows) == 3 and all(re.search(cell, r) for r in rows), rows


def test_grids_carry_the_neck_layers_lead():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import evaluate

    from camframe import load_model

    model = load_model(str(ROOT / "tests" / "assets" / "shapes_yolo.pt"))
    parts = evaluate.neck_parts(model)
    assert parts["head inputs + top-down blocks"] == "model.12,model.15,model.18,model.21"  # YOLOv8: no stride-2 convs
    assert parts["head inputs + stride-2 convs"] == "model.15,model.16,model.18,model.19,model.21"
    lead = f"elementwise | {parts['head inputs + top-down blocks']} | avg-common"
    for size in ("full", "core", "real", "seg"):
        keys = [c.key for c in evaluate.detector_grid(model, size)]
        assert keys[0] == evaluate.YOLO_DEFAULT.key and lead in keys and len(keys) == len(set(keys)), size
    assert [c.key for c in evaluate.detector_grid(model, "quick")] == [evaluate.YOLO_DEFAULT.key]
