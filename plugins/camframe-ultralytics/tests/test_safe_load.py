"""Ultralytics checkpoints are read by torch's weights-only unpickler: a payload pickled in one does not run."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.cfg import get_cfg

import camframe
from camframe_ultralytics._load import load


class Payload:
    """Unpickled, it creates the file ``marker`` (as any code in a pickle could)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camframe", *args], capture_output=True, text=True)


@pytest.fixture()
def evil(tmp_path) -> tuple[Path, Path]:
    """A real YOLO checkpoint carrying a payload among its model's attributes, and the payload's marker."""
    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml").model
    marker = tmp_path / "payload-ran"
    model.note = Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save({"model": model}, path)
    return path, marker


def test_payload_refused_by_default_and_does_not_run(evil, tmp_path):
    path, marker = evil
    with pytest.raises(camframe.CamframeError, match=r"refused to load: it names io\.open.*--unsafe-load"):
        camframe.load_model(str(path))
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((64, 64, 3), np.uint8))
    for command in (("explain", str(image), "--out", str(tmp_path / "o")), ("layers",)):
        run = _cli(*command, "--model", str(path))
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        assert run.stderr.startswith("camframe: error: ") and "--unsafe-load" in run.stderr
    assert not marker.exists()
    # the payload is real: with the flag, Ultralytics' full unpickling runs it
    run = _cli("layers", "--model", str(path), "--unsafe-load")
    assert marker.exists(), run.stderr


def test_payload_as_the_whole_checkpoint_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save(Payload(marker), tmp_path / "bare.pt")
    with pytest.raises(camframe.CamframeError, match="--unsafe-load"):
        load(str(tmp_path / "bare.pt"))
    assert not marker.exists()


@pytest.mark.parametrize("yaml", ["yolov8n.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov8n-obb.yaml",
                                  "yolov8n-cls.yaml", "yolo26n.yaml", "rtdetr-l.yaml"])
def test_checkpoints_saved_by_ultralytics_load_safely(yaml, tmp_path):
    """``Model.save`` (Ultralytics' own checkpoint: half model, train args, metadata) loads, equal to the model."""
    from ultralytics import RTDETR

    torch.manual_seed(0)
    model = RTDETR(yaml) if yaml.startswith("rtdetr") else YOLO(yaml)
    model.save(str(tmp_path / "m.pt"))
    loaded = load(str(tmp_path / "m.pt"))
    assert type(loaded) is type(model.model) and loaded.task == model.task
    half = {k: v.half().float() if v.is_floating_point() else v for k, v in model.model.state_dict().items()}
    assert all(torch.equal(half[k], v) for k, v in loaded.state_dict().items())


def test_training_checkpoint_loads_safely(tmp_path):
    """What a training run saves: the EMA model in half, the optimizer's state, the train args, metrics."""
    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml").model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sum((p * p).sum() for p in model.parameters()).backward()
    optimizer.step()  # the optimizer's state holds momentum buffers
    args = vars(get_cfg(overrides={"imgsz": 320, "data": "coco8.yaml"}))
    ckpt = {"epoch": 3, "best_fitness": np.float64(0.5), "model": None, "ema": copy.deepcopy(model).half(),
            "updates": 12, "optimizer": optimizer.state_dict(), "scaler": {"scale": 65536.0},
            "train_args": args, "train_metrics": {"metrics/mAP50(B)": np.float64(0.25)},
            "date": "2026-12-07T00:00:00", "version": "8.4.190", "license": "AGPL-3.0"}
    torch.save(ckpt, tmp_path / "last.pt")
    loaded = load(str(tmp_path / "last.pt"))
    assert loaded.args["imgsz"] == 320 and loaded.task == "detect"
    ex = camframe.Explainer(loaded, options={"conf": 0.0, "max_det": 2})
    assert ex.adapter.imgsz == 320 and len(ex([np.zeros((96, 128, 3), np.uint8)]).targets) == 2


def test_rebuilt_coco_checkpoints_load_safely(coco_yolo11n):
    for name, path in coco_yolo11n.items():
        model = load(str(path))
        assert len(model.names) == 80 and model.task == ("segment" if name.endswith("seg") else "detect")
