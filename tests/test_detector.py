"""The detector base (``DetectorAdapter``, ``Boxes``) and the detector-side CLI: box picking, side targets,
runs with nothing to explain, images without detections.

``assets/detector_reference.json`` holds the detections, targets and rescores that camframe e529654
(before the detector base existed) gave on the shapes images and on zidane.jpg with MTCNN (a regression
check); the per-box maps are checked elementwise against a HiResCAM computed by hand with autograd.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

import camframe
from camframe import Boxes, CamframeError, DetectorAdapter, Explainer, load_image

ASSETS = Path(__file__).parent / "assets"
SHAPES = sorted((ASSETS / "shapes").glob("*.jpg"))
YOLO = ASSETS / "shapes_yolo.pt"
REFERENCE = json.loads((ASSETS / "detector_reference.json").read_text())

needs_yolo = pytest.mark.needs_plugins


@pytest.fixture(scope="module")
def yolo() -> Any:
    pytest.importorskip("camframe_ultralytics")
    return camframe.load_model(str(YOLO))


@pytest.fixture(scope="module")
def mtcnn() -> Any:
    pytest.importorskip("camframe_mtcnn", reason="install the example: pip install -e examples/camframe-mtcnn")
    return camframe.load_model("mtcnn")


def _camframe(*args: Any) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camframe", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ASSETS.parent.parent)


def _record(ex: Explainer, images: list[np.ndarray], **kwargs: Any) -> dict[str, Any]:
    """Detections, targets (with each map's size and mean on the original image) and rescores."""
    r = ex(images, **kwargs)
    dets = [[[*d.box, d.class_id, d.class_name, d.score, d.index, d.extra] for d in ds] for ds in r.detections]
    maps = r.original()
    targets = [[t.image, t.class_id, t.class_name, t.box, t.score, list(maps[u].shape), float(maps[u].mean())]
               for u, t in enumerate(r.targets)]
    with torch.no_grad():
        outputs = ex.model(r.inputs[[t.image for t in r.targets]])
    rescore = ex.adapter.rescore(outputs, [r.metas[t.image] for t in r.targets], ex.model, r.targets)
    return {"detections": dets, "targets": targets, "rescore": rescore.tolist()}


def _check_explicit_conf(ex: Explainer, image: np.ndarray, conf: float) -> None:
    """``detect(..., conf=)`` keeps the detections at or above ``conf``, the configured threshold untouched."""
    options = dict(ex.adapter.options)
    full = ex(image)
    with torch.no_grad():
        (strict,) = ex.adapter.detect(ex.model(full.inputs), full.metas, ex.model, conf=conf)
    assert ex.adapter.options == options
    assert [(d.box, d.score) for d in strict] == [(d.box, d.score) for d in full.detections[0] if d.score >= conf]
    assert 0 < len(strict) < len(full.detections[0])


def _same(got: Any, want: Any, where: str = "") -> None:
    """Equal structure and text; numbers equal to the reference's rounding (3-5 decimals)."""
    if isinstance(want, (list, dict)):
        assert type(got) in (list, tuple, dict) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        keys = want if isinstance(want, dict) else range(len(want))
        for k in keys:
            _same(got[k], want[k], f"{where}[{k}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, abs_tol=2e-3), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@needs_yolo
def test_yolo_detections_targets_and_rescores_are_those_before_the_detector_base(yolo):
    # the reference's map means were recorded with the aggregation of that time (avg of per-layer maps), and
    # its detections with the square letterbox of that time (predict()'s rectangle: plugins' test_predict.py)
    ex = Explainer(yolo, guided=False, aggregate="avg", normalise="layer", options={"rect": False})
    assert isinstance(ex.adapter, DetectorAdapter)
    shapes = [load_image(p) for p in SHAPES]
    _same(_record(ex, shapes), REFERENCE["yolo_all"], "yolo_all")
    wide = [shapes[0][40:200], shapes[1][:, 30:]]  # letterboxed with padding on one side or the other
    _same(_record(ex, wide, target=["circle", "square"], boxes=Boxes(top=2)), REFERENCE["yolo_wide"], "yolo_wide")
    _check_explicit_conf(ex, shapes[0], 0.9)


@needs_yolo
def test_yolo_box_maps_equal_a_manual_autograd_hirescam(yolo):
    """Every box's map at every default layer equals HiResCAM computed here by hand: forward hooks on a
    copy of the model, the box's class logit read from the model's own raw scores at the box's anchor,
    ``torch.autograd.grad``, ``ReLU(sum_c G * A)``; on square and non-square images."""
    import copy

    shapes = [load_image(p) for p in SHAPES[:2]]
    ex = Explainer(yolo, guided=False)
    ref = copy.deepcopy(yolo).eval().requires_grad_(False)
    named = dict(ref.named_modules())
    # the non-square crops one at a time: predict()'s rectangular letterboxes give them inputs of their own sizes
    for images in (shapes, [shapes[0][40:200]], [shapes[1][:, 30:]]):
        result = ex(images)
        assert len(result.targets) >= len(images)
        reached = 0
        for u, t in enumerate(result.targets):
            acts: dict[str, torch.Tensor] = {}
            hooks = [named[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in ex.layers]
            try:
                conf, raw = ref(result.inputs[t.image:t.image + 1].clone().requires_grad_(True))
            finally:
                for h in hooks:
                    h.remove()
            logit = raw["scores"][0, t.class_id, t.detection.index]
            confidence = float(conf.detach()[0, 4 + t.class_id, t.detection.index])
            assert confidence == pytest.approx(t.detection.score, abs=1e-5)
            assert float(logit.detach()) == pytest.approx(t.score, abs=1e-5)
            grads = torch.autograd.grad(logit, [acts[n] for n in ex.layers], allow_unused=True)
            for n, g in zip(ex.layers, grads):
                want = torch.zeros(acts[n].shape[-2:]) if g is None else (g * acts[n].detach()).sum(1)[0].clamp(min=0)
                torch.testing.assert_close(result.layer_maps[n][u], want, atol=1e-5 * float(want.max()) + 1e-7,
                                           rtol=0)
                reached += bool(want.max() > 0)
        assert reached >= len(result.targets)  # each box's map is non-zero at some layer


def test_mtcnn_detections_targets_and_rescores_are_those_before_the_detector_base(mtcnn, images):
    zidane, bus = load_image(images["zidane"]), load_image(images["bus"])
    ex = Explainer(mtcnn)
    assert isinstance(ex.adapter, DetectorAdapter)
    _same(_record(ex, [zidane]), REFERENCE["mtcnn_zidane"], "mtcnn_zidane")
    small = Explainer(mtcnn, options={"max_size": 640})  # shrunk, and two sizes in one padded batch
    _same(_record(small, [zidane, bus]), REFERENCE["mtcnn_small"], "mtcnn_small")
    _check_explicit_conf(ex, zidane, 0.99)


@pytest.mark.parametrize("given, want", [
    ("all", Boxes()), (None, Boxes()), ("top:3", Boxes(top=3)), (" top:1 ", Boxes(top=1)), ("2", Boxes(indices=(2,))),
    ("0,2,0", Boxes(indices=(0, 2))), (1, Boxes(indices=(1,))), ([3, 1], Boxes(indices=(3, 1))),
    (np.int64(4), Boxes(indices=(4,))), (torch.tensor([0, 5]), Boxes(indices=(0, 5))),
])
def test_boxes_parse_once_into_a_typed_value(given, want):
    parsed = Boxes() if given is None else Boxes.parse(given)
    assert parsed == want and Boxes.parse(parsed) is parsed and Boxes.parse(str(parsed)) == parsed


@pytest.mark.parametrize("given", ["-1", -1, [0, -2], "top:0", "top:x", "top:-1", "1,a", "", [], 1.5, True, [0.0]])
def test_boxes_refuses_what_picks_nothing_or_is_not_a_selection(given):
    with pytest.raises(CamframeError, match="^boxes .*"):
        Boxes.parse(given)


def test_boxes_pick():
    assert Boxes().pick(3) == [0, 1, 2]
    assert Boxes(top=2).pick(3) == [0, 1] and Boxes(top=5).pick(3) == [0, 1, 2]
    assert Boxes(indices=(4, 0, 2)).pick(3) == [0, 2]
    assert Boxes(indices=(999,)).pick(3) == []


def test_detector_meta_maps_boxes_and_maps_back_through_the_same_geometry():
    # a 100 x 200 image letterboxed into 64 x 64: resized to 32 x 64, 16 rows of padding above
    meta = DetectorAdapter.meta((100, 200), (64, 64), (16, 0), (32, 64))
    assert meta == {"size": (100, 200), "input": (64, 64), "offset": (16, 0), "scale": (0.32, 0.32)}
    assert DetectorAdapter.box_to_original((0, 16, 64, 48), meta) == pytest.approx((0, 0, 200, 100))
    assert DetectorAdapter.box_to_original((-5, 10, 80, 60), meta) == (0.0, 0.0, 200.0, 100.0)  # clipped
    maps = torch.zeros(2, 64, 64)
    maps[:, 16:48] = 1  # the image's region only
    back = DetectorAdapter().to_original(maps, meta)
    assert back.shape == (2, 100, 200) and bool((back == 1).all())


@needs_yolo
def test_side_targets_resolve_once_from_names_or_ids(yolo):
    ex = Explainer(yolo, guided=False)
    ids = ex.adapter.resolve_classes(["box.left", "box.right", "circle"], ex.model)
    assert ids == [-1, -3, 0] and ex.adapter.resolve_classes(ids, ex.model) == ids
    by_name = ex(SHAPES[0], boxes=0, target=["box.left", "box.right", "circle"])
    by_id = ex(SHAPES[0], boxes=0, target=ids)
    assert [(t.box, t.class_id, t.class_name) for t in by_id.targets] == \
        [(0, -1, "box.left"), (0, -3, "box.right"), (0, 0, "circle")]
    assert torch.equal(by_id.maps, by_name.maps)
    with pytest.raises(CamframeError, match="class id -5 out of range"):
        ex(SHAPES[0], target=[-5])


@needs_yolo
def test_cli_explains_box_sides(tmp_path):
    """The documented command (docs/yolo.md, box-side targets)."""
    run = _camframe("explain", "tests/assets/shapes/shapes_000.jpg", "--model", "tests/assets/shapes_yolo.pt",
                    "--boxes", "0", "--classes", "box.left,box.right,circle", "--out", tmp_path, "--quiet")
    assert run.returncode == 0, run.stderr
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())["images"]
    assert [(e["box_index"], e["class_id"], e["class_name"]) for e in entry["explanations"]] == \
        [(0, -1, "box.left"), (0, -3, "box.right"), (0, 0, "circle")]
    assert all((tmp_path / e["files"]["cam"]).is_file() for e in entry["explanations"])


@needs_yolo
@pytest.mark.parametrize("args, message", [
    (["--boxes", "999"], "nothing to explain: --boxes 999 picks none of the 10 detection(s) in 4 image(s)"),
    (["--boxes=-1"], "boxes '-1': box indices count from 0"),
    (["--boxes", "top:0"], "boxes 'top:0': expected top:K with a whole number K >= 1"),
    (["-O", "max_det=0"], "max_det must be at least 1, got 0"),
    (["--conf", "1"], "nothing to explain: no detections (a lower conf may find some) in 4 image(s)"),
])
def test_cli_run_that_would_do_nothing_fails_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    run = _camframe("explain", ASSETS / "shapes", "--model", YOLO, *args, "--out", out, "--quiet")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"camframe: error: {message}")
    assert "Traceback" not in run.stderr
    assert not out.exists() or not [p for p in out.iterdir() if p.name != ".camframe"]


@needs_yolo
def test_python_api_box_selection_and_thresholds(yolo):
    ex = Explainer(yolo, guided=False)
    result = ex(SHAPES[0], boxes=999)
    assert result.targets == [] and len(result.detections[0]) > 0
    for boxes in (-1, "-1", [0, -1]):
        with pytest.raises(CamframeError, match="box indices count from 0"):
            ex(SHAPES[0], boxes=boxes)
    with pytest.raises(CamframeError, match="max_det must be at least 1"):
        Explainer(yolo, options={"max_det": 0})
    with pytest.raises(CamframeError, match="imgsz must be at least 1"):
        Explainer(yolo, options={"imgsz": -32})
    with pytest.raises(CamframeError, match=r"conf must lie in \[0, 1\]"):
        Explainer(yolo, options={"conf": 1.5})


def test_classifier_refuses_boxes_and_detector_options(resnet18_random, tmp_path):
    ex = Explainer(resnet18_random, guided=False)
    image = np.zeros((40, 50, 3), np.uint8)
    for boxes in (0, "all", Boxes(top=1)):
        with pytest.raises(CamframeError, match="boxes apply to detectors; adapter 'torchvision'"):
            ex(image, boxes=boxes)
    assert len(ex(image).targets) == 1
    for flags in (["--boxes", "0"], ["--imgsz", "320"], ["--conf", "0.3"]):
        run = _camframe("explain", SHAPES[0], "--model", "resnet18", "--weights", "random", *flags,
                        "--out", tmp_path / "out", "--quiet")
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        assert run.stderr.startswith("camframe: error: ") and not (tmp_path / "out" / "manifest.json").exists()


class _Tiles(DetectorAdapter):
    """A detector adapter of this test's own: declares a ``--tiles`` flag."""

    name = "tiles"
    defaults = {"conf": 0.5, "tiles": 2}
    cli_options = {**DetectorAdapter.cli_options, "tiles": "tiles per side"}


def test_cli_offers_the_flags_adapters_declare(capsys, monkeypatch):
    from camframe.plugins import manager as _plugins
    from camframe.cli import _options, build_parser

    class Plugin:
        @camframe.hookimpl
        def camframe_adapters(self) -> list[camframe.Adapter]:
            return [_Tiles()]

    plugin = Plugin()
    monkeypatch.setenv("COLUMNS", "200")
    _plugins.adapters()  # load the installed plugins first
    _plugins.pm.register(plugin, name="test-tiles")
    try:
        args = build_parser().parse_args(["explain", "x.jpg", "--model", "m", "--out", "o", "--tiles", "3"])
        options = _options(args)
        with pytest.raises(SystemExit):
            build_parser().parse_args(["explain", "--help"])
    finally:
        _plugins.pm.unregister(plugin)
    assert options == {"tiles": "3"}
    text = capsys.readouterr().out
    assert "--tiles TILES" in text and "tiles per side (adapter option tiles: tiles)" in text
    (conf,) = [line for line in text.splitlines() if line.strip().startswith("--conf CONF")]  # names its adapters
    assert "tiles" in conf.partition("(adapter option conf: ")[2].rstrip(")").split(", ")


def _write(path: Path, image: np.ndarray) -> Path:
    cv2.imwrite(str(path), image)
    return path


def test_image_without_detections_is_reported_and_the_run_goes_on(mtcnn, images, tmp_path):
    tiny = _write(tmp_path / "tiny.png", np.full((15, 15, 3), 128, np.uint8))  # under MTCNN's 20-pixel faces
    result = Explainer(mtcnn)(tiny)
    assert result.targets == [] and result.detections == [[]]
    out = tmp_path / "out"
    run = _camframe("explain", tiny, images["zidane"], "--model", "mtcnn", "--batch-size", "1", "--out", out,
                    "--quiet")
    assert run.returncode == 0, run.stderr
    assert f"{tiny}: no detections above the confidence threshold" in run.stderr
    tiny_entry, zidane_entry = json.loads((out / "manifest.json").read_text())["images"]
    assert tiny_entry["detections"] == [] and tiny_entry["explanations"] == []
    assert len(zidane_entry["explanations"]) == 4
    run = _camframe("explain", tiny, "--model", "mtcnn", "--out", tmp_path / "none", "--quiet")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == \
        "camframe: error: nothing to explain: no detections (a lower conf may find some) in 1 image(s)"


@needs_yolo
def test_blank_image_has_no_detections_and_the_run_goes_on(yolo, tmp_path):
    blank = _write(tmp_path / "blank.png", np.zeros((64, 64, 3), np.uint8))
    assert Explainer(yolo, guided=False)(blank).detections == [[]]
    run = _camframe("explain", blank, SHAPES[0], "--model", YOLO, "--batch-size", "1", "--out", tmp_path / "out",
                    "--quiet")
    assert run.returncode == 0, run.stderr
    blank_entry, shapes_entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["images"]
    assert blank_entry["explanations"] == [] and len(shapes_entry["explanations"]) > 0
    run = _camframe("explain", blank, "--model", YOLO, "--out", tmp_path / "none", "--quiet")
    assert run.returncode == 2 and "nothing to explain: no detections" in run.stderr
    assert not (tmp_path / "none" / "manifest.json").exists()
