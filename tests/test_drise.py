"""D-RISE (``method="drise"``): per-box maps of a detector without gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import camframe
from camframe import CamframeError, Explainer
from camframe.core.aggregate import minmax
from camframe.cli import main
from camframe.adapters.detector import Boxes
from camframe.methods.drise import DRISE, masks_from_grids, plan, weights

pytestmark = pytest.mark.needs_plugins

ASSETS = Path(__file__).parent / "assets"
SHAPES = sorted((ASSETS / "shapes").glob("*.jpg"))
FAST = {"imgsz": 128}  # the shapes detector at half its input size: 4x fewer pixels per masked forward
FEW = {"masks": 12, "grid": 8, "mask_batch": 4}


@pytest.fixture(scope="module")
def shapes() -> nn.Module:
    return camframe.load_model(str(ASSETS / "shapes_yolo.pt"))


def _inside(heat: torch.Tensor, box: tuple[float, ...]) -> bool:
    y, x = divmod(int(heat.argmax()), heat.shape[1])
    return box[0] <= x + 0.5 <= box[2] and box[1] <= y + 0.5 <= box[3]


def test_map_of_each_box_peaks_in_it(shapes):
    ex = Explainer(shapes, method="drise", options=FAST, method_options={"masks": 40, "grid": 8})
    gradient = Explainer(shapes, options=FAST, guided=False)
    hits, boxes = 0, 0
    with ex:
        for path in SHAPES:
            result = ex([path])
            # each target's score is the class logit the gradient methods report for the same box and class,
            # whose sigmoid is the box's confidence
            ref = gradient([path]).targets
            assert [(t.box, t.class_id) for t in result.targets] == [(t.box, t.class_id) for t in ref]
            scores = torch.tensor([t.score for t in result.targets])
            torch.testing.assert_close(scores, torch.tensor([t.score for t in ref]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(scores.sigmoid(), torch.tensor([t.detection.score for t in result.targets]),
                                       atol=1e-5, rtol=1e-5)
            assert result.layer_maps.keys() == {"input"} and ex.layers == {}
            size = camframe.load_image(path).shape[:2]
            for u, (t, heat) in enumerate(zip(result.targets, result.original())):
                assert heat.shape == size and 0 <= float(heat.min()) and 0.5 < float(heat.max()) <= 1
                hits += _inside(heat, t.detection.box)
                boxes += 1
    assert boxes >= 8 and hits >= 0.8 * boxes, (hits, boxes)


def test_seeded_batched_and_no_gradients(shapes):
    def run(**options):
        ex = Explainer(shapes, method="drise", options=FAST, method_options={**FEW, **options})
        return ex([SHAPES[0]], boxes="top:2")

    first = run()
    assert torch.equal(first.maps, run().maps)  # the same seed: the same maps, run to run
    assert not torch.allclose(first.maps, run(seed=1).maps, atol=1e-3)
    assert torch.allclose(first.layer_maps["input"], run(mask_batch=5).layer_maps["input"], atol=1e-6, rtol=1e-4)
    assert not first.maps.requires_grad and first.guided is None


def test_one_image_does_not_depend_on_its_batch(shapes):
    ex = Explainer(shapes, method="drise", options=FAST, method_options=FEW)
    alone, both = ex([SHAPES[1]], boxes="top:1"), ex([SHAPES[0], SHAPES[1]], boxes="top:1")
    assert torch.allclose(alone.maps[0], both.maps[1], atol=1e-5)


def test_matches_vision_explanation_methods(shapes, monkeypatch):
    """The same masks and detections give vision-explanation-methods' D-RISE map, to float error."""
    from vision_explanation_methods.explanations import common
    from vision_explanation_methods.explanations import drise as reference

    ex = Explainer(shapes, method="drise", options=FAST)
    ex.adapter.fill_value = 0.0  # vision-explanation-methods multiplies the image by the mask
    n, grid = 16, 8

    def record(dets):
        return common.DetectionRecord(torch.tensor([d.box for d in dets]), torch.ones(len(dets)),
                                      torch.stack([d.probs for d in dets]))

    class Wrapped(common.GeneralObjectDetectionModelWrapper):
        def predict(self, x):
            found = ex.adapter.detect(ex.model(x), metas * len(x), ex.model, conf=ex.adapter.rescore_threshold())
            return [record(dets) for dets in found]

    with ex, torch.no_grad():
        x, metas = ex.preprocess([SHAPES[2]])
        outputs = ex.model(x.clone())
        targets = ex.adapter.targets(outputs, ex.adapter.detect(outputs, metas, ex.model), None, Boxes(), ex.model)
        ours = DRISE(ex.model, ex.adapter, x, metas, targets, masks=n, seed=7, mask_batch=5, grid=grid, keep=0.5)
        masks = iter(masks_from_grids(*plan(n, x.shape[-2:], grid, 0.5, 7), x.shape[-2:]))
        monkeypatch.setattr(reference, "generate_mask", lambda *args: next(masks).repeat(3, 1, 1))
        theirs = reference.DRISE_saliency(Wrapped(), x, [record([t.detection for t in targets])], n,
                                          mask_res=(grid, grid))[0]
    assert len(targets) >= 2
    for mine, their in zip(minmax(ours), theirs):
        assert torch.allclose(mine, their["detection"][0], atol=1e-4)


def test_similarity_without_class_vectors():
    """No ``probs``: IoU times the score of a detection of the target's class."""
    box = (0.0, 0.0, 10.0, 10.0)
    target = camframe.Target(0, 1, "b", box=0, detection=camframe.Detection(box, 1, "b", 0.9))
    found = [camframe.Detection((0.0, 0.0, 10.0, 5.0), 1, "b", 0.8), camframe.Detection(box, 2, "c", 0.99)]
    assert torch.allclose(weights([target], found), torch.tensor([0.4]))
    assert weights([target], []).tolist() == [0.0]


def test_other_class_uses_one_hot_target(shapes):
    """Asking a box for another class compares the masked detections' vectors with that class alone."""
    ex = Explainer(shapes, method="drise", options=FAST, method_options=FEW)
    own, other = ex([SHAPES[0]], boxes="0"), ex([SHAPES[0]], target=["cross"], boxes="0")
    assert other.targets[0].class_name == "cross" != own.targets[0].class_name
    assert not torch.allclose(own.maps, other.maps, atol=1e-3)


def test_torchvision_detector_and_model_restored(monkeypatch):
    """A torchvision detector (random SSDlite) through D-RISE: its flags come back, also on error."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None,
                                         score_thresh=0.001, topk_candidates=1, detections_per_img=3)
    model.train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    image = (torch.rand(200, 240, 3) * 255).to(torch.uint8).numpy()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    ex = Explainer(model, method="drise", method_options={"masks": 2, "mask_batch": 2})
    result = ex([image], boxes="top:1")
    assert result.maps.shape == (1, 320, 320) and result.original()[0].shape == (200, 240)
    assert result.targets[0].detection.probs is not None  # SSD's softmax, background included

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the first call is the unmasked image's; fail on the masked ones
            raise RuntimeError("detector failed")
        return type(ex.adapter).detect(ex.adapter, *args, **kwargs)

    monkeypatch.setattr(ex.adapter, "detect", failing)
    with pytest.raises(RuntimeError):
        ex([image], boxes="top:1")
    assert all(m.training for m in model.modules())
    assert not frozen.requires_grad and all(p.requires_grad for p in list(model.parameters())[1:])
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


@pytest.mark.parametrize("call, message", [
    (dict(method_options={"masks": 0}), "masks must be a whole number >= 1"),
    (dict(method_options={"keep": 1.0}), "keep must lie strictly between 0 and 1"),
    (dict(method_options={"cells": 4}), "takes no option cells"),
    (dict(layers=["model.15"]), "takes no layers"),
    (dict(guided=True), "guided backprop does not apply"),
])
def test_bad_settings(shapes, call, message):
    with pytest.raises(CamframeError, match=message):
        Explainer(shapes, method="drise", **call)


def test_gradient_methods_take_no_method_options(shapes):
    with pytest.raises(CamframeError, match="takes no method options"):
        Explainer(shapes, method="gradcam", method_options={"masks": 10})


def test_pseudo_class_and_callable_targets_refused(shapes):
    ex = Explainer(shapes, method="drise", options=FAST, method_options=FEW)
    with pytest.raises(CamframeError, match="explains a box's class"):
        ex([SHAPES[0]], target=["box.left"], boxes="0")
    with pytest.raises(CamframeError, match="not a callable"):
        ex([SHAPES[0]], target=lambda outputs: outputs[0][:, 0, 0])


def test_cli(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["explain", str(SHAPES[0]), "--model", str(ASSETS / "shapes_yolo.pt"), "--method", "drise",
                 "--masks", "8", "--mask-batch", "4", "--seed", "3", "--imgsz", "128", "--boxes", "top:1",
                 "--quiet", "--out", str(out)]) == 0
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "drise" and manifest["layers"] == []
    assert manifest["method_options"] == {"masks": 8, "seed": 3, "mask_batch": 4, "grid": 16, "keep": 0.5}
    assert (out / manifest["images"][0]["explanations"][0]["files"]["cam"]).is_file()
    assert main(["plugins"]) == 0 and "drise" in capsys.readouterr().out.split("methods:")[1]


@pytest.mark.parametrize("args, message", [
    (["--model", str(ASSETS / "shapes_yolo.pt"), "--method", "drise", "--masks", "0"], "masks must be"),
    (["--model", "mobilenet_v2", "--weights", "random", "--method", "drise"], "explains whole images"),
    (["--model", str(ASSETS / "shapes_yolo.pt"), "--masks", "5"], "takes no method options"),
])
def test_cli_errors(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["explain", str(SHAPES[0]), *args, "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
