"""Support-grouped gradients (camframe.engine.support): every target's maps equal to one backward per target."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import camframe
from camframe.engine import support as _support

ultralytics = pytest.importorskip("ultralytics")
from ultralytics import YOLO  # noqa: E402

ASSETS = Path(ultralytics.__file__).parent / "assets"
CACHE = Path(os.environ.get("CAMFRAME_CACHE") or Path(__file__).resolve().parents[1] / ".cache")


def mosaic() -> np.ndarray:
    """A 2×2 mosaic of Ultralytics' bus.jpg and zidane.jpg, each tile 640×640."""
    bus, zidane = (cv2.resize(camframe.load_image(ASSETS / n), (640, 640)) for n in ("bus.jpg", "zidane.jpg"))
    return np.concatenate([np.concatenate([bus, zidane], 1), np.concatenate([zidane, bus], 1)], 0)


def both(model, images, target=None, boxes=None, **kwargs) -> tuple:
    """Results with and without grouping, and the grouped run's counts."""
    out = []
    for group in (False, True):
        with camframe.Explainer(model, group=group, **kwargs) as ex:
            out.append(ex(images, target=target, boxes=boxes))
            counts = dict(ex.groups)
    assert counts["at least"] <= counts["backward passes"] <= counts["targets"]
    return out[0], out[1], counts


def assert_same(a, b) -> None:
    """Every target's layer maps and aggregated map equal within 1e-6 of the map's max."""
    assert [(t.image, t.class_id, t.detection.index) for t in a.targets] == \
        [(t.image, t.class_id, t.detection.index) for t in b.targets]
    for name in a.layer_maps:
        peak = a.layer_maps[name].amax((1, 2)).clamp(min=1e-30)
        assert ((a.layer_maps[name] - b.layer_maps[name]).abs().amax((1, 2)) <= 1e-6 * peak).all(), name
        assert torch.equal(a.reached[name], b.reached[name])
    assert ((a.maps - b.maps).abs().amax((1, 2)) <= 1e-6 * a.maps.amax((1, 2)).clamp(min=1e-30)).all()


@pytest.fixture(scope="module")
def coco11():
    path = CACHE / "yolo11n.pt"
    if not path.is_file():
        pytest.skip(f"{path} missing (make setup)")
    return YOLO(str(path), verbose=False)


def test_yolo11n_mosaic_groups_and_equal(coco11):
    a, b, counts = both(coco11, [mosaic()])
    assert len(a.targets) >= 10
    assert counts["targets"] == len(a.targets) and counts["backward passes"] < len(a.targets)
    assert_same(a, b)


def test_yolov8n_random_many_boxes_in_a_batch():
    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml", verbose=False)
    images = [camframe.load_image(ASSETS / "bus.jpg"), camframe.load_image(ASSETS / "zidane.jpg")]
    a, b, counts = both(yolo, images, options={"conf": 0.0, "max_det": 60, "imgsz": 640})
    assert counts["backward passes"] < counts["targets"] == len(a.targets)
    assert_same(a, b)


def test_windows_hold_every_single_target_gradient(coco11, monkeypatch):
    """Each target's one-backward gradient is zero outside its window at every layer (the windows'
    claim, checked directly, box by box), also on inputs of other sizes than the probe's, which reuse
    its templates: one probe per head level and branch for all three sizes."""
    probes = []
    real = _support.Support._probe
    monkeypatch.setattr(_support.Support, "_probe", lambda self, missing, *a: probes.append(len(missing)) or
                        real(self, missing, *a))
    sizes = set()
    with camframe.Explainer(coco11) as ex:
        for image in (mosaic(), camframe.load_image(ASSETS / "bus.jpg"), camframe.load_image(ASSETS / "zidane.jpg")):
            x, metas = ex.preprocess([image])
            sizes.add(tuple(x.shape[-2:]))
            with torch.enable_grad(), ex._capture.recording():
                outputs = ex.model(x.clone())
            ex._shape = tuple(x.shape)
            targets = ex.adapter.targets(outputs, ex.adapter.detect(outputs, metas, ex.model), None, None, ex.model)
            acts = ex._capture.activations
            windows = ex._windows(acts, ex.adapter.score, outputs, targets)
            assert len(targets) > 1 and sum(w is not None for w in windows) == len(targets)
            names = list(acts)
            for i, t in enumerate(targets):
                grads = torch.autograd.grad(ex.adapter.score(outputs, [t]).sum(), [acts[n] for n in names],
                                            retain_graph=True, allow_unused=True, materialize_grads=True)
                for n, g in zip(names, grads):
                    m = _support.masks([windows[i]], n, tuple(g.shape[-2:]), g.device)[0, 0]
                    assert not g[0].abs().sum(0)[~m].any(), (i, n)
    assert len(sizes) == 3 and probes[0] >= 2 and sum(probes) == len(ex._support._templates) <= 6


def test_pathological_every_window_meets():
    """At 96 pixels every probe window reaches a map border: nothing is grouped, maps unchanged."""
    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml", verbose=False)
    a, b, counts = both(yolo, [camframe.load_image(ASSETS / "bus.jpg")], options={"conf": 0.0, "max_det": 10,
                                                                                 "imgsz": 96})
    assert counts["at least"] == counts["backward passes"] == counts["targets"] == len(a.targets) == 10
    assert_same(a, b)


def test_same_anchor_never_grouped(coco11):
    """Several classes of one box share its anchor: each gets its own backward pass."""
    with camframe.Explainer(coco11) as ex:
        many = ex([camframe.load_image(ASSETS / "bus.jpg")], target=[0, 5, 2], boxes=[0])
        assert ex.groups["backward passes"] == ex.groups["targets"] == 3
    with camframe.Explainer(coco11, group=False) as ex:
        assert_same(ex([camframe.load_image(ASSETS / "bus.jpg")], target=[0, 5, 2], boxes=[0]), many)


def test_model_restored_after_probe(coco11):
    before = {k: v.clone() for k, v in coco11.model.state_dict().items()}
    with camframe.Explainer(coco11) as ex:
        private = {k: v.clone() for k, v in ex.model.state_dict().items()}
        ex([mosaic()])
        assert all(torch.equal(v, private[k]) for k, v in ex.model.state_dict().items())
        assert not any(m._forward_hooks for m in ex.model.modules() if isinstance(m, _support.ACTIVATIONS))
    assert all(torch.equal(v, before[k]) for k, v in coco11.model.state_dict().items())


def test_non_local_method_masked_per_target(coco11):
    """Grad-CAM's channel weights (a spatial mean) come from each target's own masked gradient."""
    a, b, counts = both(coco11, [mosaic()], method="gradcam")
    assert counts["backward passes"] < counts["targets"]
    assert_same(a, b)


def test_grouped_rounds_in_batched_vjps(coco11):
    """``grad_batch`` > 1 (several rounds in one vectorised backward) with grouped rounds: the same maps."""
    a, b, counts = both(coco11, [mosaic()], grad_batch=4)
    assert counts["backward passes"] < counts["targets"]
    assert_same(a, b)


def test_guided_and_smoothing_unchanged(coco11):
    """Guided backprop and TTA smoothing (several views, each probed at its own size) give the same."""
    a, b, counts = both(coco11, [mosaic()], guided=True)
    assert counts["backward passes"] < counts["targets"]
    assert_same(a, b)
    peak = a.guided.flatten(1).abs().amax(1).clamp(min=1e-30)
    assert ((a.guided - b.guided).flatten(1).abs().amax(1) <= 1e-6 * peak).all()
    bus = camframe.load_image(ASSETS / "bus.jpg")
    a, b, counts = both(coco11, [bus, mosaic()], smooth="tta")
    assert counts["backward passes"] < counts["targets"]
    assert a.views == b.views and min(a.views) > 1
    assert_same(a, b)


@pytest.mark.parametrize("model", ["yolov8n-pose.yaml", "yolov8n-obb.yaml", "yolo11n-seg.pt"])
def test_pose_obb_seg_heads_grouped_and_equal(model):
    """Every head branch Ultralytics has (keypoints, angles, masks' boxes) groups with unchanged maps; a
    keypoint's and a mask's targets too (a mask target is never grouped: its prototypes span the image)."""
    torch.manual_seed(0)
    if model.endswith(".pt"):  # the COCO weights (a random seg head finds nothing)
        if not (CACHE / model).is_file():
            pytest.skip(f"{CACHE / model} missing (make setup)")
        yolo, image, options, k = YOLO(str(CACHE / model), verbose=False), mosaic(), {}, 8
    else:
        image = np.ascontiguousarray(np.concatenate([camframe.load_image(ASSETS / "bus.jpg")] * 2, 1))
        yolo, options, k = YOLO(model, verbose=False), {"conf": 0.0, "max_det": 40, "imgsz": 640}, 40
    a, b, counts = both(yolo, [image], options=options)
    assert counts["backward passes"] < counts["targets"] == len(a.targets) >= k
    assert_same(a, b)
    part = {"yolov8n-pose.yaml": "kpt:nose", "yolov8n-obb.yaml": None, "yolo11n-seg.pt": "mask"}[model]
    if part is not None:
        a, b, counts = both(yolo, [image], options=options, target=[part, 0], boxes="top:8")
        assert counts["targets"] == len(a.targets) == 16
        assert_same(a, b)
        # a mask's target (unbounded) has a pass of its own; the 8 boxes' share some
        assert (9 if part == "mask" else 1) <= counts["backward passes"] < 16


def test_cli_profile_and_no_group(coco11, tmp_path):
    """``--profile`` names the stages and the backward passes; ``--no-group`` writes the same maps with one
    pass per box."""
    from camframe.cli import main

    image = tmp_path / "mosaic.png"
    cv2.imwrite(str(image), mosaic()[:, :, ::-1])
    runs = {}
    for flags in ([], ["--no-group"]):
        out = tmp_path / ("out" + "".join(flags))
        proc = subprocess.run([sys.executable, "-m", "camframe", "explain", str(image), "--model",
                               str(CACHE / "yolo11n.pt"), "--out", str(out), "--save-maps", "--profile", "--quiet",
                               *flags], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stderr.splitlines()
        assert lines[0] == "camframe: profile of 1 image(s), wall seconds per stage:"
        stages = {line[:28].strip(): float(line[28:].split()[0]) for line in lines[1:-1]}
        assert {"loading the model", "forward and detections", "backward passes", "maps", "writing files",
                "total"} <= set(stages)
        assert abs(sum(v for k, v in stages.items() if k != "total") - stages["total"]) < 0.01
        counts = dict(part.split(": ") for part in lines[-1].strip().split(", "))
        runs[bool(flags)] = (out, int(counts["targets"]), int(counts["backward passes"]))
    (grouped, k, passes), (per_box, k2, passes2) = runs[False], runs[True]
    assert k == k2 == passes2 > passes
    maps = sorted(p.name for p in grouped.glob("*.npy"))
    assert len(maps) > k and maps == sorted(p.name for p in per_box.glob("*.npy"))  # and the overview
    for name in maps:
        x, y = np.load(grouped / name), np.load(per_box / name)
        assert np.abs(x - y).max() <= 1e-6 * max(np.abs(y).max(), 1e-30), name
    assert main(["explain", str(image), "--model", "m.pt", "--out", str(tmp_path / "r"), "--ray", "--profile"]) == 2


def test_footprint_is_the_window_without_a_probe():
    """An adapter's footprint, widened by MARGIN and clipped to each map, is the window: no probe runs and
    no anchor is asked; one that does not name exactly the captured layers bounds nothing; where no
    target has a footprint or an anchor, no layer's shape is looked at."""
    from types import SimpleNamespace

    class Bounding(camframe.Adapter):
        def footprint(self, target, outputs, shapes):
            return [{"a": (1, 2, 5, 9), "b": None}, {"a": (0, 0, 0, 0)}, None, {"a": (6, 7, 0, 1), "b": (0, 0, 0, 0)},
                    {"a": (0, 0, 0, 0), "b": None}][target.i]

        def anchor(self, target, outputs):
            assert target.i in (1, 2)  # asked only where no footprint bounds the target
            return None

    def never(*_):
        pytest.fail("looked at")

    m = _support.MARGIN
    targets = [SimpleNamespace(image=0, i=i) for i in range(4)]
    windows = _support.Support(torch.nn.Identity(), Bounding()).windows(
        targets, None, lambda: {"a": (8, 10), "b": (4, 4)}, never, never)
    assert windows == [{"a": (max(1 - m, 0), min(2 + m, 7), 5 - m, min(9 + m, 9)), "b": None}, None, None,
                       {"a": (6 - m, 7, 0, 1 + m), "b": (0, m, 0, m)}]
    # one bounded target per image: nothing to group, so no window either
    alone = [SimpleNamespace(image=0, i=0), SimpleNamespace(image=1, i=4)]
    assert _support.Support(torch.nn.Identity(), Bounding()).windows(
        alone, None, lambda: {"a": (8, 10), "b": (4, 4)}, never, never) == [None, None]
    assert _support.Support(torch.nn.Identity(), camframe.Adapter()).windows(
        targets[:2], None, never, never, never) == [None, None]
