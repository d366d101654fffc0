"""Smoothing (``smooth=`` / ``--smooth``): tta, eigen and noise, on the shapes detector and classifiers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from camframe import CamframeError, ClassifierAdapter, DetectorAdapter, Explainer, load_image, load_model, method
from camframe.cli import main
from camframe.methods.weightings import eigencam, elementwise, gradcam
from camframe.engine.smooth import Smooth
from camframe.methods.eigen import eigen
from camframe.testing import _check_restored, _snapshot

ROOT = Path(__file__).resolve().parent.parent
DETECTOR = ROOT / "tests" / "assets" / "shapes_yolo.pt"
SHAPES = sorted((ROOT / "tests" / "assets" / "shapes").glob("*.jpg"))


@pytest.fixture(scope="module")
def detector():
    return load_model(str(DETECTOR))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1])


@pytest.mark.parametrize("spec, text", [("tta", "tta"), ("eigen", "eigen"), ("noise:4", "noise:4:0.15"),
                                        ("noise:2:0.3", "noise:2:0.3"), ("noise:2:0.3:7", "noise:2:0.3:7"),
                                        ("none", None), (None, None)])
def test_specs(spec, text):
    parsed = Smooth.parse(spec)
    assert (None if parsed is None else str(parsed)) == text
    if parsed is not None:
        assert Smooth.parse(str(parsed)) == parsed  # the canonical text (resume keys, manifest) parses back


@pytest.mark.parametrize("spec", ["noise:0", "noise", "noise:x", "noise:4:-1", "noise:4:nan", "noise:4:0.1:1.5",
                                  "blur", "tta:2", "eigen:1", 3])
def test_bad_specs_are_one_line_errors(spec):
    with pytest.raises(CamframeError) as err:
        Smooth.parse(spec)
    assert "\n" not in str(err.value) and ("noise" in str(err.value) or "tta" in str(err.value))


class Intensity(nn.Module):
    """A classifier whose elementwise map at ``feat`` is the input's brightness: the score is the mean
    of ``feat``, so the gradient is constant and G⊙A is ``feat`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.feat.weight.fill_(1.0)
            self.feat.bias.fill_(6.0)  # positive everywhere (inputs are normalised)

    def forward(self, x):
        return torch.cat([self.feat(x).mean((1, 2, 3))[:, None], torch.zeros(len(x), 1)], 1)


class Letterboxed(ClassifierAdapter):
    """The Intensity model's targets, but letterboxed into a square like a detector's input."""

    def preprocess(self, images, model):
        import cv2

        batch, metas = [], []
        for im in images:
            h, w = im.shape[:2]
            gain = self.size / max(h, w)
            ch, cw = max(round(h * gain), 1), max(round(w * gain), 1)
            top, left = (self.size - ch) // 2, (self.size - cw) // 2
            canvas = np.full((self.size, self.size, 3), 114, np.uint8)
            canvas[top:top + ch, left:left + cw] = cv2.resize(im, (cw, ch), interpolation=cv2.INTER_LINEAR)
            batch.append(canvas)
            metas.append(DetectorAdapter.meta((h, w), (self.size, self.size), (top, left), (ch, cw)))
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div(255)
        return x, metas

    def to_original(self, maps, meta):
        return DetectorAdapter.to_original(self, maps, meta)


@pytest.mark.parametrize("adapter", [ClassifierAdapter(size=96), Letterboxed(size=96)], ids=["resize", "letterbox"])
def test_tta_maps_come_back_onto_the_image(adapter):
    """Brightness is what every view's map shows, so the views pulled back onto the unaugmented input
    must agree with its own map: the zooms and flips are undone in the right place."""
    yy, xx = np.mgrid[0:150, 0:230]
    image = (np.stack([np.sin(xx / 13.0) * np.cos(yy / 17.0)] * 3, -1) * 120 + 128).astype(np.uint8)
    model = Intensity().eval()
    plain = Explainer(model, layers="feat", adapter=adapter, guided=False)([image])
    smooth = Explainer(model, layers="feat", adapter=adapter, guided=False, smooth="tta")([image])
    assert smooth.views == [6] and smooth.smooth == "tta"
    region = plain.original()[0], smooth.original()[0]
    assert _corr(*region) > 0.98
    assert float((region[0] - region[1]).abs().mean()) < 0.04


@pytest.mark.needs_plugins
def test_tta_is_flip_equivariant(detector):
    """A flipped image's views are the original's views flipped, so its tta maps are the flipped maps."""
    image = load_image(SHAPES[1])
    ex = Explainer(detector, smooth="tta")
    with ex:
        a, b = ex([image]), ex([np.ascontiguousarray(image[:, ::-1])])
    plain = Explainer(detector)([np.ascontiguousarray(image[:, ::-1])])
    assert len(a.targets) == len(b.targets) >= 2
    w = image.shape[1]
    for u, t in enumerate(a.targets):
        x1, y1, x2, y2 = t.detection.box
        v = min(range(len(b.targets)), key=lambda k: sum(abs(p - q) for p, q in
                                                           zip(b.targets[k].detection.box, (w - x2, y1, w - x1, y2))))
        assert b.targets[v].class_id == t.class_id
        torch.testing.assert_close(b.maps[v], a.maps[u].flip(-1), atol=1e-4, rtol=0)
        assert float((plain.maps[v] - a.maps[u].flip(-1)).abs().max()) > 0.05  # without tta it is not
        assert b.targets[v].score == plain.targets[v].score  # the unaugmented score is reported


@pytest.mark.needs_plugins
def test_tta_tracks_each_box_on_the_shapes_detector(detector):
    """Each box is followed into the views by IoU with its transformed box: its map stays on its own
    box (also beside another box of the same class), views that lose it are skipped and counted."""
    before = _snapshot(detector)
    images = [load_image(p) for p in SHAPES]
    plain = Explainer(detector)(images)
    result = Explainer(detector, smooth="tta")(images)
    _check_restored("tta", "the model", before, detector)
    assert [(t.image, t.box, t.class_id, t.score) for t in result.targets] == \
        [(t.image, t.box, t.class_id, t.score) for t in plain.targets]
    assert all(1 <= v <= 6 for v in result.views) and max(result.views) == 6 and min(result.views) < 6
    classes = [(t.image, t.class_id) for t in result.targets]
    assert len(set(classes)) < len(classes)  # some image has two boxes of one class
    for t, heat in zip(result.targets, result.original()):
        x1, y1, x2, y2 = (round(v) for v in t.detection.box)
        peak = divmod(int(heat.argmax()), heat.shape[1])
        assert y1 - 2 <= peak[0] <= y2 + 2 and x1 - 2 <= peak[1] <= x2 + 2, (t.class_name, t.detection.box, peak)


def test_eigen_sign_follows_the_unsmoothed_map():
    """The principal component's sign is arbitrary (Eigen-CAM's mean rule can disagree with the map
    after ReLU); eigen turns it to correlate positively with the unsmoothed map."""

    @method()
    def channels(activations, gradients):  # per-channel terms = the activations themselves
        return activations.sum(1)

    torch.manual_seed(0)
    flipped = 0
    for _ in range(60):
        terms = torch.randn(1, 8, 6, 6)
        plain = terms.sum(1).clamp(min=0)
        assert _corr(eigen(channels)(terms, torch.ones_like(terms)), plain) > 0
        flipped += _corr(eigencam(terms), plain) < 0
    assert flipped > 0  # cases where the sign rule matters


@pytest.mark.needs_plugins
def test_eigen_matches_pytorch_grad_cam_projection():
    """The projection is pytorch-grad-cam's get_2d_projection of the weighted activations (up to sign)."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    torch.manual_seed(1)
    a, g = torch.randn(2, 12, 7, 5).relu(), torch.randn(2, 12, 7, 5)
    for base, weighted in [(elementwise, g * a), (gradcam, g.mean((2, 3), keepdim=True) * a)]:
        ours = eigen(base)(a, g)
        ref = torch.from_numpy(get_2d_projection(weighted.numpy().copy()))
        for o, r in zip(ours, ref):
            sign = 1.0 if _corr(o, r) > 0 else -1.0
            torch.testing.assert_close(o, sign * r, atol=1e-4, rtol=1e-3)


def test_eigen_on_the_classifier_and_refusals(mobilenet, images):
    before = _snapshot(mobilenet)
    photo = load_image(images["chelsea"])
    plain = Explainer(mobilenet, method="gradcam", guided=False)([photo])
    smooth = Explainer(mobilenet, method="gradcam", guided=False, smooth="eigen")([photo])
    _check_restored("eigen", "the model", before, mobilenet)
    assert smooth.targets[0].class_id == plain.targets[0].class_id and smooth.smooth == "eigen"
    assert smooth.targets[0].score == pytest.approx(plain.targets[0].score)
    assert 0.3 < _corr(smooth.maps, plain.maps) < 0.9999  # not the same map, but the same object
    with pytest.raises(CamframeError, match="eigencam"):
        Explainer(mobilenet, method="eigencam", smooth="eigen")
    with pytest.raises(CamframeError, match="tensor"):
        Explainer(mobilenet, smooth="tta")(torch.zeros(1, 3, 64, 64))


def test_noise_is_seeded_and_batch_independent(mobilenet, images):
    photos = [load_image(images["chelsea"]), load_image(images["coffee"])]
    ex = Explainer(mobilenet, guided=False, smooth="noise:3")
    with ex:
        both, alone, again = ex(photos), ex(photos[1:]), ex(photos[1:])
    other = Explainer(mobilenet, guided=False, smooth="noise:3:0.15:1")(photos[1:])
    plain = Explainer(mobilenet, guided=False)(photos[1:])
    assert both.views == [3, 3] and both.smooth == "noise:3:0.15"
    assert torch.equal(alone.maps, again.maps)
    torch.testing.assert_close(both.maps[1], alone.maps[0], atol=1e-5, rtol=0)
    assert float((other.maps - alone.maps).abs().max()) > 1e-3  # another seed, other noise
    assert float((plain.maps - alone.maps).abs().max()) > 1e-3
    assert alone.targets[0].score == pytest.approx(plain.targets[0].score)


@pytest.mark.needs_plugins
def test_noise_tracks_boxes_on_the_detector(detector):
    before = _snapshot(detector)
    result = Explainer(detector, smooth="noise:2:0.05")([load_image(SHAPES[0])])
    _check_restored("noise", "the model", before, detector)
    assert len(result.views) == len(result.targets) and all(0 <= v <= 2 for v in result.views)
    assert any(v == 2 for v in result.views)


def test_error_inside_a_view_restores_the_model(mobilenet, images):
    before = _snapshot(mobilenet)
    calls = []

    def score(outputs):
        calls.append(1)
        if len(calls) > 2:  # the first views pass, then one fails
            raise RuntimeError("boom")
        return outputs[:, 281]

    with pytest.raises(RuntimeError, match="boom"):
        Explainer(mobilenet, guided=False, smooth="tta")([load_image(images["chelsea"])], target=score)
    _check_restored("a failing view", "the model", before, mobilenet)


@pytest.mark.needs_plugins
def test_cli_explain_and_evaluate(tmp_path, capsys):
    out = tmp_path / "explain"
    assert main(["explain", *map(str, SHAPES[:2]), "--model", str(DETECTOR), "--smooth", "tta", "--workers", "0",
                 "--quiet", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["smooth"] == "tta"
    entries = [e for image in manifest["images"] for e in image["explanations"]]
    assert entries and all(e["smooth"] == "tta" and 1 <= e["views"] <= 6 for e in entries)
    bad = tmp_path / "bad"
    assert main(["explain", str(SHAPES[0]), "--model", str(DETECTOR), "--smooth", "noise:0", "--quiet",
                 "--out", str(bad)]) == 2
    assert not bad.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("camframe: error: ") and "noise" in err[0]

    ev = tmp_path / "evaluate"
    args = ["evaluate", *map(str, SHAPES[:2]), "--model", str(DETECTOR), "--aggregates", "avg", "--smooth",
            "none,eigen", "--steps", "2", "--fill", "mean", "--quiet", "--workers", "0", "--out", str(ev)]
    assert main(args) == 0
    rows = list(csv.DictReader((ev / "results.csv").open()))
    assert [(r["aggregate"], r["smooth"]) for r in rows] == [("avg", "none"), ("avg", "eigen")]
    log = (ev / "evaluation.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in log]
    assert len(log) == 4 and len(set(keys)) == 4  # the smoothing is part of each record's key
    assert main(args) == 0
    assert (ev / "evaluation.jsonl").read_text().splitlines() == log  # resumed: nothing recomputed
