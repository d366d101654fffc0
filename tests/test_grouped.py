"""Support-grouped gradients (camframe.engine.support): every target's maps equal to one backward per target."""

from __future__ import annotations

import os
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


def both(model, images, **kwargs) -> tuple:
    """Results with and without grouping, and the grouped run's counts."""
    out = []
    for group in (False, True):
        with camframe.Explainer(model, group=group, **kwargs) as ex:
            out.append(ex(images))
            counts = dict(ex.groups)
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


def test_windows_hold_every_single_target_gradient(coco11):
    """Each target's one-backward gradient is zero outside its window at every layer (the windows'
    claim, checked directly, box by box)."""
    with camframe.Explainer(coco11) as ex:
        x, metas = ex.preprocess([mosaic()])
        with torch.enable_grad(), ex._capture.recording():
            outputs = ex.model(x.clone())
        ex._shape = tuple(x.shape)
        targets = ex.adapter.targets(outputs, ex.adapter.detect(outputs, metas, ex.model), None, None, ex.model)
        acts = ex._capture.activations
        windows = ex._windows(acts, ex.adapter.score, outputs, targets)
        assert sum(w is not None for w in windows) == len(targets)
        names = list(acts)
        for i, t in enumerate(targets):
            grads = torch.autograd.grad(ex.adapter.score(outputs, [t]).sum(), [acts[n] for n in names],
                                        retain_graph=True, allow_unused=True, materialize_grads=True)
            for n, g in zip(names, grads):
                m = _support.masks([windows[i]], n, tuple(g.shape[-2:]), g.device)[0, 0]
                assert not g[0].abs().sum(0)[~m].any(), (i, n)


def test_pathological_every_window_meets():
    """At 96 pixels every probe window reaches a map border: nothing is grouped, maps unchanged."""
    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml", verbose=False)
    a, b, counts = both(yolo, [camframe.load_image(ASSETS / "bus.jpg")], options={"conf": 0.0, "max_det": 10,
                                                                                 "imgsz": 96})
    assert counts["backward passes"] == counts["targets"] == len(a.targets) == 10
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


def test_footprint_is_the_window_without_a_probe():
    """An adapter's footprint, widened by MARGIN and clipped to each map, is the window: no probe runs and
    no anchor is asked; one that does not name exactly the captured layers bounds nothing; where no
    target has a footprint or an anchor, no layer's shape is looked at."""
    class Bounding(camframe.Adapter):
        def footprint(self, target, outputs, shapes):
            return [{"a": (1, 2, 5, 9), "b": None}, {"a": (0, 0, 0, 0)}, None][target]

        def anchor(self, target, outputs):
            assert target != 0  # asked only where no footprint bounds the target
            return None

    def never(*_):
        pytest.fail("looked at")

    m = _support.MARGIN
    windows = _support.Support(torch.nn.Identity(), Bounding()).windows(
        [0, 1, 2], None, lambda: {"a": (8, 10), "b": (4, 4)}, never, never)
    assert windows == [{"a": (max(1 - m, 0), min(2 + m, 7), 5 - m, min(9 + m, 9)), "b": None}, None, None]
    assert _support.Support(torch.nn.Identity(), camframe.Adapter()).windows([0, 1], None, never, never, never) \
        == [None, None]
