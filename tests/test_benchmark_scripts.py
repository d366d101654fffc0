"""The benchmark scripts' measuring code runs on today's engine (they run for minutes, outside the suite:
here each path once, on the small shapes YOLO)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import cv2
import pytest

import camframe

pytest.importorskip("ultralytics")
ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "tests" / "assets" / "shapes"


def script(name: str):
    """``benchmarks/<name>.py`` as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_ceiling_with_inputs_of_different_sizes(tmp_path):
    """The engine-only ceiling takes ragged batches (letterboxed to different rectangles)."""
    pipeline = script("pipeline_speed")
    paths = []
    for k, (w, h) in enumerate([(256, 256), (384, 192), (192, 320)]):
        paths.append(tmp_path / f"{k}.jpg")
        cv2.imwrite(str(paths[-1]), cv2.resize(cv2.imread(str(SHAPES / f"shapes_00{k}.jpg")), (w, h)))
    ex = camframe.Explainer(camframe.load_model(str(ROOT / "tests" / "assets" / "shapes_yolo.pt")))
    assert pipeline.ceiling(ex, paths, 3) > 0


def test_grouped_case_and_report():
    grouped = script("grouped_speed")
    image = camframe.load_image(SHAPES / "shapes_000.jpg")
    model = camframe.load_model(str(ROOT / "tests" / "assets" / "shapes_yolo.pt"))
    case = grouped.case("shapes", model, image, {"conf": 0.0, "max_det": 12}, 1, peer=False)
    assert case["boxes"] == 12 and case["bound"] <= case["groups"] < 12 and case["diff"] == 0
    text = grouped.report([case], 1)
    assert "| shapes (" in text and f"12 boxes in {case['groups']} backward passes" in text
