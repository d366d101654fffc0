"""`camframe evaluate`: YOLO labels and COCO JSON, Markdown/CSV tables, resuming, report."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camframe
from camframe import CamframeError, ClassifierAdapter, Explainer, metrics
from camframe.cli import main
from camframe.evaluation.harness import Config, Curves, configs, evaluate, score_result, summarise, table_csv, table_markdown
from camframe.core.truth import Truth

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import shapes  # noqa: E402

DETECTOR = ROOT / "tests" / "assets" / "shapes_yolo.pt"


@pytest.fixture
def labelled(tmp_path):
    folder = shapes.write_labelled(tmp_path / "data", shapes.HELDOUT_SEEDS[10:12])
    return folder


@pytest.mark.needs_plugins
def test_grid_tables_and_resume(labelled, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", str(labelled), "--model", str(DETECTOR), "--methods", "elementwise,layercam",
            "--layer-sets", "default", "neck", "--aggregates", "max", "--steps", "2", "--fill", "mean", "--quiet",
            "--out", str(out)]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["method"], r["layers"], r["aggregate"]) for r in rows] == [
        ("elementwise", "default", "max"), ("elementwise", "neck", "max"),
        ("layercam", "default", "max"), ("layercam", "neck", "max")]
    for r in rows:
        assert int(r["matched"]) >= 4 and 0 <= float(r["ebpg_mean"]) <= 1
        assert float(r["pointing_low"]) <= float(r["pointing_mean"]) <= float(r["pointing_high"])
        assert float(r["deletion_mean_mean"]) < float(r["insertion_mean_mean"])
    table = (out / "results.md").read_text()
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 4
    assert "elementwise · neck · max" in table and "deletion ↓ (mean)" in table and "(blur)" not in table
    log = (out / "evaluation.jsonl").read_text().splitlines()
    assert len(log) == 4 * 2
    # a rerun resumes: nothing is computed twice, and a line cut short by an interruption is redone
    (out / "evaluation.jsonl").write_text("\n".join(log[:-1]) + "\n" + log[-1][:20])
    assert main(args) == 0
    log2 = (out / "evaluation.jsonl").read_text().splitlines()
    assert len(log2) == 8 and log2[:7] == log[:7] and json.loads(log2[-1])["path"] == json.loads(log[-1])["path"]
    captured = capsys.readouterr()
    assert "elementwise · default · max" in captured.out
    assert [line for line in captured.err.splitlines() if "warning" in line] == [
        f"camframe: warning: {out / 'evaluation.jsonl'}: skipped 1 malformed line(s) (8); they are redone"]


def test_coco_labels_and_report(images, mobilenet_weights, tmp_path):
    coco = ROOT / "benchmarks" / "data" / "photos_coco.json"
    out = tmp_path / "eval"
    code = main(["evaluate", str(images["chelsea"]), str(images["bus"]), "--model", "mobilenet_v2", "--weights",
                 mobilenet_weights, "--labels", str(coco), "--methods", "gradcam", "--aggregates", "avg",
                 "--steps", "4", "--quiet", "--report", "--out", str(out)])
    assert code == 0
    row = next(csv.DictReader((out / "results.csv").open()))
    assert row["matched"] == "2" and float(row["pointing_mean"]) == 1.0
    for metric in ("deletion_blur", "insertion_blur", "deletion_mean", "insertion_mean"):  # both fills by default
        assert math.isfinite(float(row[f"{metric}_mean"])) and float(row[f"{metric}_mean"]) >= 0  # probabilities
        # (the AUCs' values: test_deletion_and_insertion_aucs_on_a_linear_model)
    html = (out / "index.html").read_text()
    assert "<table>" in html and html.count('class="thumb"') == 2


class _BoxSum(nn.Module):
    """Class 0's logit is the sum of channel 0 over an 8 x 8 box (rows and columns 8..15); class 1's is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.feat.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
        self.register_buffer("box", torch.zeros(32, 32))
        self.box[8:16, 8:16] = 1

    def forward(self, x):
        s = (self.feat(x)[:, 0] * self.box).sum((1, 2))
        return torch.stack([s, torch.zeros_like(s)], 1)


class _LogitAdapter(ClassifierAdapter):
    """Deletion/insertion follow the class logit itself (linear in the pixels), not its softmax."""

    def rescore(self, outputs, metas, model, targets):
        return self.logits(outputs)[torch.arange(len(targets)), [t.class_id for t in targets]]


def test_deletion_and_insertion_aucs_on_a_linear_model():
    """A white image; the target's logit is the sum over an 8 x 8 box, which is the ground truth: its map is 1
    on the box and 0 elsewhere. With 4 steps of 2 box areas each step k perturbs 32 k pixels, the box's own
    first: the zero fill removes half the box at step 1 and all of it at step 2, so the deletion curve is
    1, 1/2, 0, 0, 0 (trapezoidal AUC 1/4) and the insertion curve 0, 1/2, 1, 1, 1 (AUC 3/4); the mean fill
    of a uniform image changes nothing (both curves 1, AUC 1). The box holds every bit of the map (EBPG 1)."""
    ex = Explainer(_BoxSum(), layers=["feat"], adapter=_LogitAdapter(size=32), guided=False)
    truth = Truth(torch.tensor([[8.0, 8.0, 16.0, 16.0]]), [None], ["box"])
    (row,) = score_result(ex, ex([np.full((32, 32, 3), 255, np.uint8)]), [truth],
                          Curves(steps=4, fills=("zero", "mean")))
    assert row["matched"] and row["class_id"] == 0
    assert row["pointing"] == 1 and row["ebpg"] == pytest.approx(1)
    assert row["deletion_zero"] == pytest.approx(0.25, abs=1e-6)
    assert row["insertion_zero"] == pytest.approx(0.75, abs=1e-6)
    assert row["deletion_mean"] == pytest.approx(1, abs=1e-6) and row["insertion_mean"] == pytest.approx(1, abs=1e-6)


def test_localisation_intervals_stay_in_0_1():
    # EBPG near 1 and 9 pointing hits of 10: Student-t intervals would pass 1 (ebpg_high 1.0197 in #21)
    rows = [{"matched": True, "pointing": float(i > 0), "ebpg": e, "discrimination": 0.0, "deletion_mean": d}
            for i, (e, d) in enumerate(zip([0.99, 0.97, 1.0, 0.6, 0.98] * 2, [0.2, 1.4] * 5))]
    table = summarise([{"config": "gradcam | default | max", "seconds": 1.0, "rows": rows}])
    row = next(csv.DictReader(table_csv(table).splitlines()))
    for m in ("pointing", "ebpg", "discrimination"):
        assert 0 <= float(row[f"{m}_low"]) <= float(row[f"{m}_mean"]) <= float(row[f"{m}_high"]) <= 1
    assert float(row["ebpg_high"]) == 1 and float(row["pointing_high"]) < 1
    assert float(row["deletion_mean_high"]) > 1  # an AUC relative to the unperturbed score is not bounded by 1
    cells = table_markdown(table).splitlines()[-1].split(" | ")
    assert cells[3] == f"**{table[0]['ebpg'][0]:.3f} ({table[0]['ebpg'][1]:.3f}–1.000)**" and "±" in cells[5]


@pytest.mark.needs_plugins
def test_bad_labels_are_one_line_errors(labelled, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code = main(["evaluate", str(labelled), "--model", str(DETECTOR), "--labels", str(bad), "--quiet",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "not a readable COCO" in capsys.readouterr().err


# --------------------------------------------------------------------------- resume keys and settings
FAST = Curves(steps=2, fills=("mean",))
BOX = Truth(torch.tensor([[4.0, 4.0, 20.0, 24.0]]), [None], ["thing"])


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


@pytest.fixture
def pictures(tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"p{i}.png")
        cv2.imwrite(str(paths[-1]), (torch.rand(32, 40, 3) * 255).byte().numpy())
    return paths


def run(model: nn.Module, paths, log, truth=BOX, curves=FAST) -> list[dict]:
    explainers = {"elementwise | default | avg": Config("elementwise", "default", "avg").explainer(model)}
    return list(evaluate(explainers, paths, lambda path, size: truth, log, curves=curves))


def test_a_record_is_reused_only_when_everything_that_determines_it_matches(pictures, tmp_path):
    log, model = tmp_path / "evaluation.jsonl", tiny_model()
    lines = lambda: len(log.read_text().splitlines())  # noqa: E731  (one line per computed record)
    first = run(model, pictures, log)
    assert lines() == 2 and "deletion_mean" in first[0]["rows"][0]
    assert run(model, pictures, log) == first and lines() == 2  # same everything: reused
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained[-1].bias += 1.0
    other_box = Truth(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), [None], ["thing"])
    for what, kwargs in {"weights": dict(model=retrained), "ground truth": dict(truth=other_box),
                         "steps": dict(curves=Curves(steps=3, fills=("mean",))),
                         "fill": dict(curves=Curves(steps=2, fills=("zero",))),
                         "schedule": dict(curves=Curves(steps=2, fills=("mean",), schedule="image")),
                         "extent": dict(curves=Curves(steps=2, fills=("mean",), extent=1.0))}.items():
        before = lines()
        run(**{"model": model, "paths": pictures, "log": log, **kwargs})
        assert lines() == before + 2, what
    cv2.imwrite(str(pictures[0]), cv2.imread(str(pictures[0])) // 2)  # new content, same path
    before = lines()
    run(model, pictures, log)
    assert lines() == before + 1


def test_malformed_log_lines_are_skipped_with_one_warning(pictures, tmp_path, capsys):
    log, model = tmp_path / "evaluation.jsonl", tiny_model()
    first = run(model, pictures, log)
    good = log.read_text().splitlines()
    log.write_text("\n".join([good[0], "not json", "[1, 2]", '{"config": "x"}', good[1][:30]]))
    capsys.readouterr()
    assert run(model, pictures, log) == first[:1] + run(model, pictures[1:], log)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"camframe: warning: {log}: skipped 4 malformed line(s) (2, 3, 4, 5); they are redone"]
    assert log.read_text().splitlines()[0] == good[0] and len(log.read_text().splitlines()) == 2


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=-3), dict(steps=2.5), dict(fills=()),
                                 dict(fills=("grey",)), dict(schedule="pixels"), dict(extent=0.0)])
def test_bad_curve_settings_are_one_line_errors(bad):
    with pytest.raises(CamframeError) as info:
        Curves(**bad)
    assert "\n" not in str(info.value)


def test_a_black_box_method_runs_once_whatever_the_layers_and_aggregates():
    grid = configs(["elementwise", "drise"], ["neck", "head-inputs"], ["max", "avg"], ["none", "tta"])
    assert len([c for c in grid if c.method == "elementwise"]) == 8
    assert [c.key for c in grid if c.method == "drise"] == ["drise | default | max"]  # takes no layers, no smoothing


def test_nothing_to_evaluate_is_an_error(pictures, tmp_path):
    with pytest.raises(CamframeError, match="nothing to evaluate: no methods"):
        configs([], ["default"], ["avg"])
    with pytest.raises(CamframeError, match="nothing to evaluate"):
        list(evaluate({}, pictures, lambda path, size: BOX, tmp_path / "log.jsonl"))
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--steps", "-2"], ["--methods", ","], ["--aggregates", ","],
                                 ["--fill", "grey"], ["--extent", "0"], ["--schedule", "pixels"]])
def test_cli_bad_settings_are_one_line_errors(labelled, tmp_path, capsys, bad):
    out = tmp_path / "out"
    code = main(["evaluate", str(labelled), "--model", str(DETECTOR), "--quiet", "--out", str(out), *bad])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("camframe: error: ")
    assert not out.exists()


@pytest.mark.needs_plugins
def test_cli_resume_recomputes_when_settings_or_labels_change(labelled, tmp_path):
    out, relabelled = tmp_path / "eval", tmp_path / "relabelled"
    relabelled.mkdir()
    for txt in labelled.glob("*.txt"):  # the same images with one box fewer each
        (relabelled / txt.name).write_text("".join(txt.read_text().splitlines(keepends=True)[1:]))
    args = ["evaluate", str(labelled / "s0.png"), "--model", str(DETECTOR), "--methods", "elementwise",
            "--aggregates", "avg", "--steps", "1", "--fill", "mean", "--quiet", "--out", str(out)]
    lines = lambda: len((out / "evaluation.jsonl").read_text().splitlines())  # noqa: E731
    assert main(args) == 0 and lines() == 1
    for change in (["--conf", "0.3"], ["--steps", "2"], ["--fill", "zero"], ["--schedule", "image"],
                   ["--labels", str(relabelled)]):
        before = lines()
        assert main(args + change) == 0
        assert lines() == before + 1, change
    assert main(args) == 0 and lines() == 6  # the first run's record, reused


# --------------------------------------------------------------------------- validation with known answers
FILLS = ("blur", "mean")


@pytest.fixture(scope="module")
def shapes_image() -> tuple:
    """A held-out shapes image (RGB) and its ground truth: the detector's evidence is each shape."""
    bgr, boxes = shapes.make_image(shapes.HELDOUT_SEEDS[0])
    truth = Truth(torch.tensor([b for _, b in boxes], dtype=torch.float32), [c for c, _ in boxes],
                  [shapes.CLASSES[c] for c, _ in boxes])
    return bgr[:, :, ::-1].copy(), truth


def clear_patch(box: torch.Tensor, objects: torch.Tensor, size: int, gap: float = 8.0) -> torch.Tensor:
    """A patch as large as ``box``, at least ``gap`` pixels from every object (first in raster order)."""
    w, h = box[2] - box[0], box[3] - box[1]
    for y in range(0, int(size - h), 4):
        for x in range(0, int(size - w), 4):
            patch = torch.tensor([x, y, x + w, y + h])
            if all(patch[0] > o[2] + gap or patch[2] < o[0] - gap or patch[1] > o[3] + gap or patch[3] < o[1] - gap
                   for o in objects):
                return patch
    raise AssertionError("no clear patch")


@pytest.mark.needs_plugins
def test_deletion_ranks_object_random_and_background_maps(shapes_image):
    """Deleting a box's own pixels first must hurt the detection much more than deleting an equally
    large background patch; smooth random maps fall in between; under both fills. A box whose
    evidence is gone scores 0 (the curve reaches 0 and stays finite)."""
    image, truth = shapes_image
    ex = camframe.Explainer(camframe.load_model(str(DETECTOR)), guided=False)
    aucs = {fill: torch.zeros(3) for fill in FILLS}  # object, background, random: mean over boxes
    vanished = False
    with ex:
        result = ex([image])
        _, _, size, _ = result.inputs.shape
        gain = size / image.shape[1]  # a square image is letterboxed without padding
        random = F.interpolate(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), (size, size),
                               mode="bilinear")[:, 0]
        for t in result.targets:
            box = torch.tensor(t.detection.box) * gain
            regions = torch.stack([box, clear_patch(box, truth.boxes * gain, size)])
            maps = torch.cat([metrics.box_masks(regions, size, size).float(), random])
            area = ((box[2] - box[0]) * (box[3] - box[1])).expand(len(maps))
            score = lambda x, src, t=t: ex.adapter.rescore(  # noqa: E731
                ex.model(x), [result.metas[0]] * len(x), ex.model, [t] * len(x))
            for fill in FILLS:
                curve, auc = metrics.deletion_insertion(result.inputs.expand(len(maps), -1, -1, -1), maps, score,
                                                        steps=5, fill=fill, area=area)
                assert not curve.isnan().any()
                vanished |= bool((curve[0] == 0).any())
                aucs[fill] += torch.stack([auc[0], auc[1], auc[2:].mean()]) / len(result.targets)
    assert len(result.targets) == 3 and vanished
    for fill, (own, background, scattered) in aucs.items():
        assert own < background - 0.4 and own < scattered < background, fill


@pytest.mark.needs_plugins
def test_curves_rank_gradcam_below_elementwise_on_the_detector(shapes_image):
    image, truth = shapes_image
    model = camframe.load_model(str(DETECTOR))
    means = {}
    for method in ("elementwise", "gradcam"):
        ex = Config(method, "default", "avg").explainer(model)
        with ex:
            rows = [r for r in score_result(ex, ex([image]), [truth], Curves(steps=5)) if r["matched"]]
        means[method] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.startswith(("del", "ins"))}
    assert set(means["elementwise"]) == {f"{m}_{f}" for m in ("deletion", "insertion") for f in FILLS}
    for fill in FILLS:
        assert means["elementwise"][f"deletion_{fill}"] < means["gradcam"][f"deletion_{fill}"] - 0.1, fill
        assert means["elementwise"][f"insertion_{fill}"] > means["gradcam"][f"insertion_{fill}"] + 0.1, fill
