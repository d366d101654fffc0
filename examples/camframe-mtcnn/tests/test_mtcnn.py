"""The MTCNN example plugin: same faces as facenet-pytorch, sound adapter, maps on the faces.

Needs the plugin installed (``pip install -e examples/camframe-mtcnn``) and Ultralytics for its
sample photos (zidane.jpg: two men, faces visible; bus.jpg: small faces).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import camframe
from camframe import CamframeError, Explainer, load_image
from camframe.testing import check_adapter

pytest.importorskip("facenet_pytorch")
pytest.importorskip("camframe_mtcnn", reason="install the example: pip install -e examples/camframe-mtcnn")
from camframe_mtcnn.model import CELL, PAD, STRIDE, MTCNNDetector, normalise  # noqa: E402

MARGIN = 0.10  # pointing: the map's peak may sit this fraction of the box size outside the box


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    ultralytics = pytest.importorskip("ultralytics")
    assets = Path(ultralytics.__file__).parent / "assets"
    return {"zidane": assets / "zidane.jpg", "bus": assets / "bus.jpg"}


@pytest.fixture(scope="module")
def model() -> MTCNNDetector:
    return camframe.load_model("mtcnn")


def _camframe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camframe", *args], capture_output=True, text=True, timeout=300)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("name", ["zidane", "bus"])
def test_detector_finds_the_faces_facenet_finds(model, photos, name):
    from facenet_pytorch import MTCNN

    image = load_image(photos[name])
    boxes, probs = MTCNN(keep_all=True, select_largest=False).detect(image)
    with torch.no_grad():
        out = model(normalise(torch.tensor(image).permute(2, 0, 1)[None].float()))
    order = out["probs"].argsort(descending=True)
    assert np.allclose(out["boxes"][order].numpy(), np.asarray(boxes, dtype=np.float32), atol=0.05)
    assert np.allclose(out["probs"][order].numpy(), np.asarray(probs, dtype=np.float32), atol=1e-4)


def test_adapter_passes_the_kit(model, photos, tmp_path):
    result = check_adapter(model, [photos["zidane"], photos["bus"]], spec="mtcnn", out_dir=tmp_path)
    assert result.adapter.name == "mtcnn"
    assert [len(d) for d in result.detections] == [4, 2]


def test_cli_map_of_each_face_points_at_that_face(photos, tmp_path):
    run = _camframe("explain", str(photos["zidane"]), "--model", "mtcnn", "--out", str(tmp_path), "--save-maps",
                    "--quiet")
    assert run.returncode == 0, run.stderr
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())["images"]
    faces, explanations = entry["detections"], entry["explanations"]
    assert sum(d["detection_score"] > 0.99 for d in faces) >= 2  # both men
    assert [e["box_index"] for e in explanations] == list(range(len(faces)))
    for e in explanations:
        (x1, y1, x2, y2), heat = faces[e["box_index"]]["box"], np.load(tmp_path / e["files"]["map"])
        assert heat.shape == (720, 1280)
        y, x = np.unravel_index(int(heat.argmax()), heat.shape)
        mx, my = MARGIN * (x2 - x1), MARGIN * (y2 - y1)
        assert x1 - mx <= x <= x2 + mx and y1 - my <= y <= y2 + my, f"box {e['box_index']}: peak at x={x}, y={y}"
        assert e["target_score_kind"] == "pnet-logit"
        assert torch.sigmoid(torch.tensor(e["target_score"])) >= 0.6  # the score is a logit PNet let through


def test_each_map_lies_in_the_pnet_window_that_proposed_the_face(model, photos):
    result = Explainer(model)(photos["zidane"])
    for heat, t in zip(result.original(), result.targets):
        extra = t.detection.extra
        row, col = (c - PAD // STRIDE for c in extra["cell"])
        x1, y1 = STRIDE * col / extra["scale"], STRIDE * row / extra["scale"]
        side = CELL / extra["scale"]
        window = heat[max(int(y1), 0):int(y1 + side) + 1, max(int(x1), 0):int(x1 + side) + 1]
        assert float(window.sum()) >= 0.99 * float(heat.sum()), f"box {t.box}"


def test_options_and_box_selection(model, photos):
    full = Explainer(model, options={"conf": 0.9})(photos["zidane"])
    assert len(full.targets) == 2
    assert [t.box for t in Explainer(model)(photos["zidane"], boxes="top:1").targets] == [0]
    assert Explainer(model)(np.full((240, 320, 3), 128, np.uint8)).targets == []
    # shrunk to 640 pixels: the same two faces, boxes and maps in the original's pixels
    small = Explainer(model, options={"conf": 0.9, "max_size": 640})(photos["zidane"])
    assert [tuple(m.shape) for m in small.original()] == [(720, 1280)] * 2
    for a, b in zip(full.detections[0], small.detections[0]):
        assert _iou(a.box, b.box) > 0.75, (a.box, b.box)
    with pytest.raises(CamframeError, match="takes no option thresh"):
        Explainer(model, options={"thresh": 0.5})


def test_plugins_lists_mtcnn():
    run = _camframe("plugins")
    assert run.returncode == 0, run.stderr
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("mtcnn ")]
    assert "camframe-mtcnn" in line and "0.1.0" in line and "camframe_adapters, camframe_load_model" in line
    assert "mtcnn" in run.stdout.split("adapters:")[1].splitlines()[0]


def test_layers_command_marks_the_default(capsys):
    from camframe.cli import main

    assert main(["layers", "--model", "mtcnn"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "* default layers of adapter 'mtcnn' (aggregate: max)"
    assert [line.split()[1] for line in lines[:-1] if line.startswith("* ")] == ["pnet.prelu2"]
