"""`camframe evaluate`: YOLO labels and COCO JSON, Markdown/CSV tables, resuming, report."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import cv2
import pytest

from camframe._cli import main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import shapes  # noqa: E402

DETECTOR = ROOT / "tests" / "assets" / "shapes_yolo.pt"


@pytest.fixture
def labelled(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, seed in enumerate(shapes.HELDOUT_SEEDS[10:12]):
        image, boxes = shapes.make_image(seed)
        cv2.imwrite(str(folder / f"s{i}.png"), image)
        h, w = image.shape[:2]
        (folder / f"s{i}.txt").write_text("".join(
            f"{c} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n"
            for c, (x1, y1, x2, y2) in boxes))
    return folder


def test_grid_tables_and_resume(labelled, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", str(labelled), "--model", str(DETECTOR), "--methods", "elementwise,layercam",
            "--layer-sets", "default", "neck", "--aggregates", "max", "--steps", "3", "--quiet", "--out", str(out)]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["method"], r["layers"], r["aggregate"]) for r in rows] == [
        ("elementwise", "default", "max"), ("elementwise", "neck", "max"),
        ("layercam", "default", "max"), ("layercam", "neck", "max")]
    for r in rows:
        assert int(r["matched"]) >= 4 and 0 <= float(r["ebpg_mean"]) <= 1
        assert float(r["pointing_low"]) <= float(r["pointing_mean"]) <= float(r["pointing_high"])
        assert float(r["deletion_mean"]) < float(r["insertion_mean"])
    table = (out / "results.md").read_text()
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 4
    assert "elementwise · neck · max" in table
    log = (out / "evaluation.jsonl").read_text().splitlines()
    assert len(log) == 4 * 2
    # a rerun resumes: nothing is computed twice, and a line cut short by an interruption is redone
    (out / "evaluation.jsonl").write_text("\n".join(log[:-1]) + "\n" + log[-1][:20])
    assert main(args) == 0
    log2 = (out / "evaluation.jsonl").read_text().splitlines()
    assert len(log2) == 8 and log2[:7] == log[:7] and json.loads(log2[-1])["path"] == json.loads(log[-1])["path"]
    assert "elementwise · default · max" in capsys.readouterr().out


def test_coco_labels_and_report(images, mobilenet_weights, tmp_path):
    coco = ROOT / "benchmarks" / "data" / "photos_coco.json"
    out = tmp_path / "eval"
    code = main(["evaluate", str(images["chelsea"]), str(images["bus"]), "--model", "mobilenet_v2", "--weights",
                 mobilenet_weights, "--labels", str(coco), "--methods", "gradcam", "--aggregates", "avg",
                 "--steps", "4", "--quiet", "--report", "--out", str(out)])
    assert code == 0
    row = next(csv.DictReader((out / "results.csv").open()))
    assert row["matched"] == "2" and float(row["pointing_mean"]) == 1.0
    html = (out / "index.html").read_text()
    assert "<table>" in html and html.count('class="thumb"') == 2


def test_bad_labels_are_one_line_errors(labelled, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code = main(["evaluate", str(labelled), "--model", str(DETECTOR), "--labels", str(bad), "--quiet",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "not a readable COCO" in capsys.readouterr().err
