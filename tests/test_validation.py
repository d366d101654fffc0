"""One validation layer: each bad argument fails before the model runs, with the same one-line
message from the Python API (``CamframeError``) and from the CLI (``camframe: error: ...``, exit 2,
nothing written)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import camframe
from camframe import CamframeError, Explainer

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "tests" / "assets" / "shapes"
YOLO = str(ROOT / "tests" / "assets" / "shapes_yolo.pt")
RANDOM = ["--model", "mobilenet_v2", "--weights", "random"]
ON_YOLO = ["--model", YOLO]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camframe", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``camframe:`` line on stderr, which must be its last (Ultralytics may log a settings notice
    before it), after exit status 2 and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in lines if line.startswith("camframe")] == lines[-1:], proc.stderr
    assert lines[-1].startswith("camframe: error: "), proc.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """State dicts for the wrong architecture: MobileNetV2 with 10 classes, and a ResNet-18."""
    root = tmp_path_factory.mktemp("weights")
    made = {"ten-classes": torchvision.models.mobilenet_v2(num_classes=10), "resnet18": torchvision.models.resnet18()}
    for name, model in made.items():
        torch.save(model.state_dict(), root / f"{name}.pt")
    return {name: root / f"{name}.pt" for name in made}


@pytest.fixture(scope="module")
def mobilenet_random() -> nn.Module:
    return camframe.load_model("mobilenet_v2", "random")


@pytest.fixture(scope="module")
def yolo() -> nn.Module:
    return camframe.load_model(YOLO)


def _cases(weights: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """Case name -> (``camframe explain`` arguments after the image, expected message start)."""
    return {
        "device-meta": ([*RANDOM, "--device", "meta"], "unknown device 'meta'; use auto, cpu, cuda, cuda:N or mps"),
        "device-nonsense": ([*RANDOM, "--device", "banana"], "unknown device 'banana'"),
        "device-index": ([*RANDOM, "--device", "cuda:99"], "device 'cuda:99'"),
        "adapter-mismatch": ([*RANDOM, "--adapter", "ultralytics"],
                             "adapter 'ultralytics' does not fit a model of type MobileNetV2"),
        "option-type": ([*ON_YOLO, "-O", "max_det=abc"], "adapter 'ultralytics': option max_det must be int"),
        "imgsz-negative": ([*ON_YOLO, "--imgsz", "-32"], "imgsz must be at least 1, got -32"),
        "imgsz-zero": ([*ON_YOLO, "--imgsz", "0"], "imgsz must be at least 1, got 0"),
        "factory-result": (["--model", "os:getcwd"], "'os:getcwd' is not a model factory: it returned str"),
        "factory-call": (["--model", "torch.nn:Conv2d"], "'torch.nn:Conv2d' is not a model factory: calling it"),
        "weights-shapes": (["--model", "mobilenet_v2", "--weights", str(weights["ten-classes"])],
                           f"{weights['ten-classes']}: weights do not fit mobilenet_v2: 2 shape mismatches "
                           "(classifier.1.weight: model (1000, 1280) vs file (10, 1280), classifier.1.bias: "
                           "model (1000,) vs file (10,))"),
        "weights-keys": (["--model", "mobilenet_v2", "--weights", str(weights["resnet18"])],
                         f"{weights['resnet18']}: weights do not fit mobilenet_v2: 314 missing keys "
                         "(features.0.0.weight, features.0.1.weight, ...), 122 unexpected keys"),
        "classes-empty": ([*RANDOM, "--classes", ","], "no classes to explain: the class list is empty"),
    }


def _api_call(case: str, images, weights, mobilenet_random, yolo) -> None:
    """The Python API's way to make the same mistake as the CLI case."""
    chelsea = images["chelsea"]
    calls = {
        "device-meta": lambda: camframe.load_model("mobilenet_v2", "random", device="meta"),
        "device-nonsense": lambda: camframe.load_model("mobilenet_v2", "random", device="banana"),
        "device-index": lambda: camframe.load_model("mobilenet_v2", "random", device="cuda:99"),
        "adapter-mismatch": lambda: Explainer(mobilenet_random, adapter="ultralytics"),
        "option-type": lambda: Explainer(yolo, options={"max_det": "abc"}),
        "imgsz-negative": lambda: Explainer(yolo, options={"imgsz": -32}),
        "imgsz-zero": lambda: Explainer(yolo, options={"imgsz": 0}),
        "factory-result": lambda: camframe.load_model("os:getcwd"),
        "factory-call": lambda: camframe.load_model("torch.nn:Conv2d"),
        "weights-shapes": lambda: camframe.load_model("mobilenet_v2", str(weights["ten-classes"])),
        "weights-keys": lambda: camframe.load_model("mobilenet_v2", str(weights["resnet18"])),
        "classes-empty": lambda: Explainer(mobilenet_random, guided=False)(chelsea, target=[]),
    }
    calls[case]()


CASES = list(_cases({"ten-classes": Path(), "resnet18": Path()}))


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, images, weights):
    """Every case as a ``camframe explain`` subprocess (3 at a time), plus a run with duplicate classes."""
    root = tmp_path_factory.mktemp("cli")
    runs = {name: [str(images["chelsea"]), *args] for name, (args, _) in _cases(weights).items()}
    runs["classes-duplicate"] = [str(images["chelsea"]), *RANDOM, "--classes", "tabby,281,Tabby"]

    def run(item):
        name, args = item
        out = root / f"out-{name}"
        return name, (run_cli("explain", *args, "--quiet", "--out", str(out), cwd=root), out)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, runs.items()))


@pytest.mark.parametrize("case", CASES)
def test_cli_refuses(cli_runs, weights, case):
    proc, out = cli_runs[case]
    line = error_line(proc)
    assert line.startswith(f"camframe: error: {_cases(weights)[case][1]}"), line
    assert not out.exists()


@pytest.mark.parametrize("case", CASES)
def test_api_refuses_with_the_cli_message(cli_runs, images, weights, mobilenet_random, yolo, case):
    with pytest.raises(CamframeError) as caught:
        _api_call(case, images, weights, mobilenet_random, yolo)
    message = str(caught.value)
    assert message.startswith(_cases(weights)[case][1]), message
    assert "\n" not in message
    assert error_line(cli_runs[case][0]) == f"camframe: error: {message}"


def test_duplicate_classes_explained_once(cli_runs, images, mobilenet_random):
    proc, out = cli_runs["classes-duplicate"]
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads((out / "manifest.json").read_text())["images"]
    assert [e["class_id"] for e in entry["explanations"]] == [281]
    assert entry["explanations"][0]["files"]["cam"] == "chelsea.cam.jpg"
    result = Explainer(mobilenet_random, guided=False)(images["chelsea"], target=["tabby", 281, "Tabby", 282, 281])
    assert [t.class_id for t in result.targets] == [281, 282]


def test_device_availability(monkeypatch):
    from camframe.core import validate as _validate

    assert _validate.device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CamframeError, match=r"^device 'cuda' is not available: no CUDA GPU found$"):
        camframe.load_model("mobilenet_v2", "random", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _validate.device("cuda:1") == "cuda:1"
    with pytest.raises(CamframeError, match=r"^device 'cuda:3' does not exist: 2 CUDA GPU\(s\), cuda:0..cuda:1$"):
        camframe.load_model("mobilenet_v2", "random", device="cuda:3")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(CamframeError, match=r"^device 'mps' is not available"):
        camframe.load_model("mobilenet_v2", "random", device="mps")


def test_typed_options(yolo):
    ex = Explainer(yolo, options={"conf": "0.3", "max_det": "5", "nms": "false", "imgsz": "none", "iou": 1})
    assert ex.adapter.options == {"conf": 0.3, "iou": 1.0, "imgsz": None, "max_det": 5, "agnostic": False,
                                  "nms": False, "rect": True}
    for bad, kind in [({"max_det": 2.5}, "int"), ({"max_det": True}, "int"), ({"nms": "maybe"}, "bool"),
                      ({"imgsz": "big"}, "int"), ({"conf": "high"}, "float")]:
        with pytest.raises(CamframeError, match=rf"^adapter 'ultralytics': option {next(iter(bad))} must be {kind}"):
            Explainer(yolo, options=bad)


@pytest.mark.parametrize("target, message", [
    (281.0, "a class is an id or a name, not float 281.0"),
    (True, "a class is an id or a name, not bool True"),
    ((), "no classes to explain: the class list is empty"),
])
def test_bad_class_targets(mobilenet_random, images, target, message):
    with pytest.raises(CamframeError, match=f"^{message}$"):
        Explainer(mobilenet_random, guided=False)(images["chelsea"], target=target)


@pytest.mark.parametrize("make, got", [
    (lambda out: 1.0, "float"),
    (lambda out: [out[0, 0], out[1, 0]], "list"),
    (lambda out: out[:, 0].sum(), "shape ()"),
    (lambda out: out[:1, 0], "shape (1,)"),
    (lambda out: out[:, :2], "shape (2, 2)"),
])
def test_bad_target_callables(mobilenet_random, images, make, got):
    image = camframe.load_image(images["chelsea"])
    expected = rf"one score per image, shape \(2,\) or \(2, 1\); got {re.escape(got)}$"
    with pytest.raises(CamframeError, match=expected):
        Explainer(mobilenet_random, guided=False)([image, image], target=make)


def test_target_callable_column_accepted(mobilenet_random, images):
    image = camframe.load_image(images["chelsea"])
    ex = Explainer(mobilenet_random, guided=False)
    result = ex([image, image], target=lambda out: out[:, 281:282])
    assert result.maps.shape == (2, 224, 224)
    with pytest.raises(CamframeError, match=r"got shape \(2, 2\)$"):
        ex([image, image], target=lambda out: out[:, 281:283])


@pytest.mark.parametrize("images_arg, message", [
    ([], "no images given"),
    (np.zeros((0, 0, 3), np.uint8), r"expected non-empty RGB uint8 images \(H, W, 3\), got uint8 \(0, 0, 3\)"),
    (torch.zeros(0, 3, 224, 224), r"expected a non-empty floating \(B, C, H, W\) tensor"),
    (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), r"expected a non-empty floating \(B, C, H, W\) tensor"),
    (torch.zeros(1, 1, 224, 224), r"the model takes 3-channel input, got a tensor of shape \(1, 1, 224, 224\)"),
])
def test_bad_image_batches(mobilenet_random, images_arg, message):
    with pytest.raises(CamframeError, match=f"^{message}"):
        Explainer(mobilenet_random, guided=False)(images_arg)


def test_channels_follow_the_model():
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    ex = Explainer(gray, layers=["0"], guided=False)
    assert ex(torch.rand(1, 1, 16, 16), target=1).maps.shape == (1, 16, 16)
    with pytest.raises(CamframeError, match=r"^the model takes 1-channel input"):
        ex(torch.rand(1, 3, 16, 16), target=1)


def test_model_comes_back_after_a_refused_target(mobilenet_random, images):
    model = torchvision.models.resnet18()
    model.train()
    with pytest.raises(CamframeError):
        Explainer(model, guided=False)(images["chelsea"], target=lambda out: out)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(CamframeError, match="a class is an id or a name, not bool True"):
        Explainer(model, guided=False)(images["chelsea"], target=True)


# --------------------------------------------------------------------------- YOLO label files
@pytest.fixture(scope="module")
def bad_labels(tmp_path_factory) -> dict[str, Path]:
    """Label folders for shapes_000.jpg: a class name, a non-number, a fractional class, binary data."""
    root = tmp_path_factory.mktemp("labels")
    contents = {
        "name": b"0 0.5 0.5 0.2 0.2\ncircle 0.5 0.5 0.2 0.2\n",
        "word": b"2 0.5 0.5 wide 0.2\n",
        "fraction": b"\n1.5 0.5 0.5 0.2 0.2\n",
        "short": b"1 0.5 0.5\n",
        "binary": bytes(range(256)) * 4,
        "nul": b"0 0.5 0.5 0.2 0.2\x00\x00\n",
    }
    folders = {}
    for name, data in contents.items():
        folders[name] = root / name
        folders[name].mkdir()
        (folders[name] / "shapes_000.txt").write_bytes(data)
    return folders


LABEL_ERRORS = {
    "name": r"shapes_000.txt:2: expected 'class cx cy w h' \(a class id and 4 numbers\), got 'circle 0.5 0.5 0.2 0.2'",
    "word": r"shapes_000.txt:1: expected 'class cx cy w h'",
    "fraction": r"shapes_000.txt:2: expected 'class cx cy w h'",
    "short": r"shapes_000.txt:1: expected 'class cx cy w h'",
    "binary": r"shapes_000.txt: not a readable text label file \(UnicodeDecodeError\)",
    "nul": r"shapes_000.txt: not a text label file \(binary data\)",
}


@pytest.mark.parametrize("case", LABEL_ERRORS)
def test_bad_yolo_labels(bad_labels, case):
    from camframe.core.truth import TruthSource

    with pytest.raises(CamframeError, match=LABEL_ERRORS[case]):
        TruthSource(bad_labels[case], None)(SHAPES / "shapes_000.jpg", (256, 256))


def test_cli_bad_label_is_one_line(bad_labels, tmp_path):
    proc = run_cli("evaluate", str(SHAPES / "shapes_000.jpg"), *ON_YOLO, "--labels", str(bad_labels["name"]),
                   "--methods", "elementwise", "--aggregates", "avg", "--steps", "2", "--quiet",
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert "shapes_000.txt:2: expected 'class cx cy w h'" in error_line(proc)


def test_option_minimums_are_checked_by_configure():
    """An adapter declares the least value of its numeric options; ``configure`` refuses a smaller one in
    one line, takes the least itself and leaves None (the model's own) alone."""
    from camframe import Adapter, CamframeError

    class Sized(Adapter):
        name = "sized"
        defaults = {"size": None, "max_det": 100}
        option_types = {"size": int}
        option_minimums = {"size": 32, "max_det": 1}

    adapter = Sized()
    adapter.configure(size="32", max_det=1)
    assert adapter.options == {"size": 32, "max_det": 1}
    adapter.configure(size=None)
    assert adapter.options["size"] is None
    for options, message in (({"size": 31}, "size must be at least 32, got 31"),
                             ({"max_det": 0}, "max_det must be at least 1, got 0")):
        with pytest.raises(CamframeError, match=f"^{message}$"):
            Sized().configure(**options)
