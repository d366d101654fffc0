"""Explaining a detector's errors: tp/fp matching, missed objects through the model's best candidate, user
boxes, contrast maps (docs/explaining-errors.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from camframe import Detection, Explainer, load_model, metrics
from camframe.core.boxes import pair_iou
from camframe.cli import main
from camframe.engine.outcomes import match, parse_boxes
from camframe.core.truth import Truth

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import shapes  # noqa: E402

DETECTOR = ROOT / "tests" / "assets" / "shapes_yolo.pt"
CONF = 0.9  # high enough that the shapes detector misses some objects


def _truth(boxes: list, classes: list[int]) -> Truth:
    return Truth(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), classes, [str(c) for c in classes])


def _det(box: tuple, cls: int, score: float) -> Detection:
    return Detection(box, cls, str(cls), score)


def test_matching_is_greedy_by_score_with_confusions():
    truth = _truth([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0, 0, 1])
    dets = [_det((0, 0, 10, 9), 0, 0.5),  # the best overlap of gt 0, but scored lower than the next one
            _det((0, 0, 10, 10), 0, 0.9),
            _det((40, 40, 50, 50), 0, 0.8),  # over gt 2, of class 1: a confusion
            _det((100, 100, 110, 110), 1, 0.7)]
    records, missed = match(dets, truth)
    assert records[1] == {"outcome": "tp", "gt_index": 0, "gt_iou": 1.0}
    assert records[0]["outcome"] == "fp" and "confused_with" not in records[0]  # gt 0 was taken: a duplicate
    assert records[2] == {"outcome": "fp", "confused_with": {"gt_index": 2, "class_id": 1, "class_name": "1",
                                                             "iou": 1.0}}
    assert records[3] == {"outcome": "fp"}
    assert missed == [1, 2]
    records, missed = match(dets, truth, threshold=0.95)
    assert missed == [1, 2] and records[0]["outcome"] == "fp"


def test_box_option_parsing(tmp_path):
    listing = tmp_path / "boxes.txt"
    listing.write_text("1,2,3,4:cat  # a comment\n\n5,6,7,8\n")
    assert parse_boxes(["0,0,9,9", str(listing)]) == [((0, 0, 9, 9), None), ((1, 2, 3, 4), "cat"),
                                                      ((5, 6, 7, 8), None)]
    for bad in ("1,2,3", "3,0,1,4", "a,b,c,d:cat"):
        with pytest.raises(Exception, match="--box"):
            parse_boxes([bad])


@pytest.fixture(scope="module")
def heldout() -> list[tuple[np.ndarray, Truth]]:
    """Held-out shapes images (RGB) with their ground truth."""
    out = []
    for seed in shapes.HELDOUT_SEEDS[20:40]:
        bgr, boxes = shapes.make_image(seed)
        out.append((cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), _truth([list(b) for _, b in boxes], [c for c, _ in boxes])))
    return out


@pytest.fixture(scope="module")
def model():
    return load_model(str(DETECTOR))


def test_missed_objects_have_candidates_over_them_and_maps_inside_them(model, heldout):
    ex = Explainer(model, options={"conf": CONF}, guided=False)
    images, truths = [im for im, _ in heldout], [t for _, t in heldout]
    result = ex(images, labels=truths)
    maps = result.original()
    hits, count = [], 0
    for b, info in enumerate(result.outcomes):
        for k, item in enumerate(info["missed"]):
            count += 1
            gt = truths[b].boxes[item["gt_index"]].tolist()
            (u,) = [u for u, t in enumerate(result.targets) if t.image == b and t.subject == ("missed", k)]
            cand = result.targets[u].detection
            assert pair_iou(cand.box, gt) > 0.5, (b, k, cand.box, gt)
            assert cand.class_id == truths[b].classes[item["gt_index"]]
            assert item["why"]["below_threshold"] is (cand.score < CONF)
            own = metrics.box_masks(torch.tensor([gt]), *maps[u].shape)
            hits.append(float(metrics.pointing_game(maps[u][None], masks=own)[0]))
    assert count >= 20  # conf 0.9 misses objects (31 of them in these 20 images)
    assert np.mean(hits) >= 0.9, hits  # the misses fall a few pixels past a small object's edge
    # every ground-truth object is either matched by a tp or missed, once
    for b, info in enumerate(result.outcomes):
        matched = [r["gt_index"] for r in info["detections"] if r["outcome"] == "tp"]
        assert sorted(matched + [m["gt_index"] for m in info["missed"]]) == list(range(len(truths[b].boxes)))


def test_yolo_candidate_is_the_best_pre_nms_prediction(model, heldout):
    """Ultralytics' own predictions with no threshold and (almost) no suppression hold the candidate: no
    prediction of the object's class overlapping it by IoU >= 0.5 scores higher than it."""
    from ultralytics import YOLO

    yolo = YOLO(str(DETECTOR))
    ex = Explainer(model, options={"conf": CONF}, guided=False)
    for image, truth in heldout[:4]:
        result = ex([image], labels=[truth])
        (pred,) = yolo.predict(image[..., ::-1].copy(), conf=0.001, iou=0.999, max_det=30000, verbose=False)
        boxes, scores, classes = pred.boxes.xyxy.tolist(), pred.boxes.conf.tolist(), pred.boxes.cls.int().tolist()
        for k, item in enumerate(result.outcomes[0]["missed"]):
            gt, c = truth.boxes[item["gt_index"]].tolist(), item["class_id"]
            cand = next(t.detection for t in result.targets if t.subject == ("missed", k))
            near = [s for bx, s, cl in zip(boxes, scores, classes) if cl == c and pair_iou(bx, gt) >= 0.5]
            assert near and cand.score >= max(near) - 1e-4
            if int(cand.probs[:-1].argmax()) == c:  # its anchor's own class: Ultralytics lists it
                assert any(abs(s - cand.score) < 1e-4 and pair_iou(bx, cand.box) > 0.99 for bx, s in zip(boxes, scores))


def test_user_box_of_a_detection_is_that_detection(model, heldout):
    image, _ = heldout[0]
    ex = Explainer(model, guided=False)
    plain = ex([image])
    det = plain.detections[0][0]
    result = ex([image], boxes=[0], regions=[[(det.box, det.class_id), (det.box, None)]])
    own, given, free = result.targets
    assert given.subject == ("user_box", 0) and given.detection.index == det.index
    assert free.detection.index == det.index and free.class_id == det.class_id  # its best class
    assert torch.allclose(result.maps[0], result.maps[1], atol=1e-6) and given.score == pytest.approx(own.score)


def test_contrast_maps(model, heldout):
    """Class a minus class b for one box: its score is the difference; by linearity its (elementwise) map is
    relu(S_a - S_b) of the signed maps S, so it and b-minus-a are never both above zero (both zero where the two
    classes' evidence agrees), and it is at least relu(S_a) - relu(S_b), the plain maps' difference."""
    image, _ = heldout[0]
    ex = Explainer(model, layers=["model.12"], method="elementwise", guided=False)
    det = ex([image]).detections[0][0]
    a, b = det.class_id, (det.class_id + 1) % 4
    plain = ex([image], target=[a, b], boxes=[0])
    ab = ex([image], target=[a], boxes=[0], contrast=b)
    ba = ex([image], target=[b], boxes=[0], contrast=a)
    assert ab.targets[0].contrast == b
    assert ab.targets[0].score == pytest.approx(plain.targets[0].score - plain.targets[1].score, abs=1e-4)
    pa, pb = plain.layer_maps["model.12"]
    cab, cba = ab.layer_maps["model.12"][0], ba.layer_maps["model.12"][0]
    scale = float(pa.max())
    assert float((cab * cba).abs().max()) <= 1e-6 * scale ** 2
    assert bool((cab >= pa - pb - 1e-5 * scale).all())
    assert float((cab - pa).abs().max()) > 1e-3 * scale  # the contrast map differs from the plain one
    assert float(cab.max()) > 0 and float(cba.max()) > 0


def test_cli_labels_box_contrast_and_report(tmp_path):
    folder = shapes.write_labelled(tmp_path / "data", shapes.HELDOUT_SEEDS[20:23])
    out = tmp_path / "out"
    assert main(["explain", str(folder), "--model", str(DETECTOR), "--conf", str(CONF), "--labels", "--save-maps",
                 "--box", "10,10,80,80:circle", "--guided", "--report", "--quiet", "--workers", "0", "--out",
                 str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    missed = [m for e in manifest["images"] for m in e["missed"]]
    assert missed and all(m["outcome"] == "fn" and m["candidate"]["iou"] > 0.5 for m in missed)
    for m in missed:
        heat = np.load(out / m["files"]["map"])
        x1, y1, x2, y2 = m["gt_box"]
        assert heat.shape == (320, 320) and set(m["files"]) == {"cam", "map", "guided-gradcam", "guided-backprop"}
        assert all((out / name).is_file() for name in m["files"].values())
        y, x = np.unravel_index(heat.argmax(), heat.shape)
        assert x1 - 8 <= x <= x2 + 8 and y1 - 8 <= y <= y2 + 8  # within a stride of the object
    for e in manifest["images"]:
        assert {d["outcome"] for d in e["detections"]} <= {"tp", "fp"}
        assert len(e["user_boxes"]) == 1 and e["user_boxes"][0]["class_name"] == "circle"
        assert [x["user_box_index"] for x in e["explanations"] if "user_box_index" in x] == [0]
    page = (out / "index.html").read_text()
    assert "<h3>missed (" in page and "<h3>correct (" in page and "missed object: " in page


def test_bad_requests_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    image = str(ROOT / "tests" / "assets" / "shapes" / "shapes_000.jpg")
    for extra, message in ((["--box", "5,5,1,1"], "x1 < x2"), (["--box", "0,0,9,9:zebra"], "unknown class"),
                           (["--contrast", "zebra"], "unknown class"), (["--labels", "--match-iou", "0"], "IoU"),
                           (["--labels", "--method", "drise"], "black-box")):
        out = tmp_path / "out"
        assert main(["explain", image, "--model", str(DETECTOR), "--quiet", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("camframe: error:") and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()


def test_evaluate_scores_the_missed_objects_maps(tmp_path):
    folder = shapes.write_labelled(tmp_path / "data", shapes.HELDOUT_SEEDS[20:24])
    out = tmp_path / "eval"
    assert main(["evaluate", str(folder), "--model", str(DETECTOR), "--conf", str(CONF), "--steps", "2", "--fill",
                 "mean", "--aggregates", "max", "--quiet", "--workers", "0", "--out", str(out)]) == 0
    import csv

    (row,) = list(csv.DictReader((out / "results.csv").open()))
    records = [json.loads(line) for line in (out / "evaluation.jsonl").read_text().splitlines()]
    missed = [r for rec in records for r in rec["rows"] if r.get("outcome") == "fn"]
    assert missed and float(row["pointing_missed_mean"]) == pytest.approx(np.mean([r["pointing_missed"]
                                                                                   for r in missed]))
    assert float(row["pointing_missed_mean"]) >= 0.75 and 0 < float(row["ebpg_missed_mean"]) <= 1
    assert int(row["targets"]) == sum(r.get("outcome") != "fn" for rec in records for r in rec["rows"])
    assert "pointing ↑ (missed)" in (out / "results.md").read_text()
