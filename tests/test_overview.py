"""The image overview map: ``<stem>.cam.jpg`` stacks a detector's box maps by per-pixel max, and
``<stem>.<class>.cam.jpg`` each class's with several ``--classes``; in the manifest, the report and
``Result.overview``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camframe import Explainer, load_model
from camframe import cli as _cli
from camframe.output.report import render

ASSETS = Path(__file__).parent / "assets"
YOLO = ASSETS / "shapes_yolo.pt"
SHAPES = [ASSETS / "shapes" / "shapes_000.jpg", ASSETS / "shapes" / "shapes_001.jpg"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two shapes images, a copy of the second named ``shapes_001.circle.jpg`` (whose overview map
    would be ``shapes_001``'s circle overview) and a blank one (no detections); 3 boxes x 2 classes,
    maps saved, report."""
    pytest.importorskip("camframe_ultralytics")  # only the tests of the YOLO run need it
    root = tmp_path_factory.mktemp("overview")
    blank = root / "blank.png"
    Image.new("RGB", (320, 320), (128, 128, 128)).save(blank)
    twin = root / "shapes_001.circle.jpg"
    twin.write_bytes(SHAPES[1].read_bytes())
    out = root / "out"
    code = _cli.main(["explain", *map(str, SHAPES), str(twin), str(blank), "--model", str(YOLO), "--boxes", "top:3",
                      "--classes", "circle,square", "--save-maps", "--report", "--quiet", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "manifest.json").read_text())


def test_one_overview_per_image_listed_in_manifest_and_report(run):
    out, manifest = run
    page = (out / "index.html").read_text()
    files = []
    for entry, stem in zip(manifest["images"][:3], ("shapes_000", "shapes_001", "shapes_001-2.circle")):
        boxes = sorted({e["box_index"] for e in entry["explanations"]})
        assert len(boxes) == min(3, len(entry["detections"])) >= 2
        overview = entry["overview_map"]
        assert overview == {"box_indices": boxes, "files": {"cam": f"{stem}.cam.jpg", "map": f"{stem}.cam.npy"}}
        by_class = entry["class_overview_maps"]
        assert [(o["class_id"], o["class_name"], o["box_indices"]) for o in by_class] == \
            [(0, "circle", boxes), (1, "square", boxes)]
        assert [o["files"]["cam"] for o in by_class] == [f"{stem}.c0-circle.cam.jpg", f"{stem}.c1-square.cam.jpg"]
        for o in [overview, *by_class]:
            assert Image.open(out / o["files"]["cam"]).size == (320, 320)
            assert f'src="./{o["files"]["cam"]}"' in page
            files += o["files"].values()
        assert f"all boxes: max of {len(boxes)} box map(s)" in page and f"circle: max of {len(boxes)} box" in page
    # no name is used twice, and the manifest accounts for every file written
    listed = [f for e in manifest["images"] for f in [e["overview"]] + [f for x in e["explanations"]
                                                                         for f in x["files"].values()]]
    assert len(set(listed + files)) == len(listed + files)
    assert {p.name for p in out.iterdir()} == {*listed, *files, "manifest.json", "index.html", ".camframe"}


def test_overview_is_the_max_of_the_box_maps(run):
    out, manifest = run
    for entry in manifest["images"][:3]:
        maps = {(e["box_index"], e["class_name"]): np.load(out / e["files"]["map"]) for e in entry["explanations"]}
        overview = np.load(out / entry["overview_map"]["files"]["map"])
        assert np.array_equal(overview, np.maximum.reduce(list(maps.values())))
        for o in entry["class_overview_maps"]:
            own = [m for (_, name), m in maps.items() if name == o["class_name"]]
            assert np.array_equal(np.load(out / o["files"]["map"]), np.maximum.reduce(own))
        # every box shows at full strength: each map is in [0, 1] with its own peak near 1 (1 at the
        # input resolution; or all 0, a class with no evidence in that box), and the overview keeps
        # every peak
        peaks = [float(m.max()) for m in maps.values()]
        assert all(p == 0 or p > 0.9 for p in peaks) and sum(p > 0 for p in peaks) >= 2
        assert overview.max() == max(peaks) <= 1


def test_no_overview_for_an_image_without_explained_boxes(run):
    out, manifest = run
    blank = manifest["images"][3]
    assert blank["detections"] == [] and blank["explanations"] == []
    assert "overview_map" not in blank and "class_overview_maps" not in blank
    assert not list(out.glob("blank.*cam*"))


def test_result_overview(run):
    out, manifest = run
    with Explainer(load_model(str(YOLO)), guided=False) as ex:
        result = ex([SHAPES[0], np.full((320, 320, 3), 128, np.uint8)], boxes="top:3", target=["circle", "square"])
    entry = manifest["images"][0]
    overview = result.overview(0)
    assert overview.shape == (320, 320)
    # a batch of two here, one image per forward pass in the command (a detector on the CPU): rounding differs
    torch.testing.assert_close(overview.numpy(), np.load(out / entry["overview_map"]["files"]["map"]),
                               rtol=0, atol=1e-5)
    square = np.load(out / entry["class_overview_maps"][1]["files"]["map"])
    torch.testing.assert_close(result.overview(0, ["square"]).numpy(), square, rtol=0, atol=1e-5)
    assert torch.equal(result.overview(0, [1]), result.overview(0, ["square"]))
    assert result.overview(1) is None and result.overview(0, ["triangle"]) is None


@pytest.mark.parametrize("classes, names", [("281,285", ["chelsea.c281-tabby.cam.jpg",
                                                        "chelsea.c285-Egyptian_cat.cam.jpg"]),
                                            ("281", ["chelsea.cam.jpg"])])
def test_classifier_names_do_not_collide(tmp_path, images, classes, names):
    """A classifier writes no overview: with several classes each has its own ``<stem>.<class>``
    file and no ``<stem>.cam.jpg``; with one, ``<stem>.cam.jpg`` is that class's map."""
    code = _cli.main(["explain", str(images["chelsea"]), "--model", "mobilenet_v2", "--weights", "random",
                      "--classes", classes, "--no-guided", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())["images"]
    assert [e["files"]["cam"] for e in entry["explanations"]] == names
    assert "overview_map" not in entry and "class_overview_maps" not in entry
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == sorted(names)


def test_report_escapes_overview_names():
    entry = {"path": "x.jpg", "explanations": [], "detections": [],
             "overview_map": {"box_indices": [0], "files": {"cam": "a#b?.cam.jpg"}},
             "class_overview_maps": [{"class_id": 3, "class_name": "<b>cat</b>", "box_indices": [0],
                                      "files": {"cam": "javascript:x.cam.jpg"}}]}
    page = render({"images": [entry]})
    assert 'src="./a%23b%3F.cam.jpg"' in page and 'src="./javascript%3Ax.cam.jpg"' in page
    assert "&lt;b&gt;cat&lt;/b&gt;: max of 1 box map(s)" in page and "<b>cat" not in page


def test_only_the_yolo_tests_skip_without_ultralytics():
    """With camframe_ultralytics unimportable, the classifier and report tests still run and pass."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['camframe_ultralytics'] = None; import pytest; "
            f"sys.exit(pytest.main([{__file__!r}, '-q', '-rA', '-p', 'no:cacheprovider', '-W', 'ignore', "
            "'-k', 'not only_the_yolo']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    passed = [l.split("::")[1] for l in proc.stdout.splitlines() if l.startswith("PASSED")]
    skipped = [l for l in proc.stdout.splitlines() if l.startswith("SKIPPED")]
    assert passed == ["test_classifier_names_do_not_collide[281,285-names0]",
                      "test_classifier_names_do_not_collide[281-names1]", "test_report_escapes_overview_names"]
    assert skipped and all("camframe_ultralytics" in l for l in skipped)
