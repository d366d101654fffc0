"""The manifest's schema, camframe-manifest/1: shipped in the package, and strict enough to refuse the old form."""

from __future__ import annotations

import copy
import json
import math
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

import camframe
from camframe import cli as _cli

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> dict:
    """A detector run with two classes per box (one of them not the box's own) and saved maps."""
    out = tmp_path_factory.mktemp("manifest") / "out"
    assert _cli.main(["explain", str(ASSETS / "shapes" / "shapes_000.jpg"), "--model", str(ASSETS / "shapes_yolo.pt"),
                      "--classes", "circle,triangle", "--boxes", "top:2", "--quiet", "--out", str(out)]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_schema_ships_in_the_package():
    schema = camframe.manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema"] == {"const": "camframe-manifest/1", "description": schema["properties"]
                                              ["schema"]["description"]}
    assert json.loads(resources.files("camframe").joinpath("schemas/manifest-1.json").read_text()) == schema
    pyproject = (ROOT / "pyproject.toml").read_text()  # a wheel carries the schema:
    assert re.search(r'^\[tool\.setuptools\.package-data\]\ncamframe = \["schemas/\*\.json", "py\.typed"\]', pyproject,
                     re.M)
    camframe.manifest_schema()["title"] = "changed"
    assert camframe.manifest_schema() == schema  # a new dict each time


def test_manifest_fields(manifest):
    jsonschema.validate(manifest, camframe.manifest_schema())
    (entry,) = manifest["images"]
    assert entry["size"] == {"width": 320, "height": 320}
    dets = entry["detections"]
    assert all(0 <= d["detection_score"] <= 1 and len(d["box"]) == 4 for d in dets)
    for e in entry["explanations"]:
        det = dets[e["box_index"]]
        assert e["detection_score"] == det["detection_score"] and e["target_score_kind"] == "logit"
        if e["class_id"] == det["class_id"]:  # the box's own class: its logit, whose sigmoid is the confidence
            assert e["supported"] is True
            assert 1 / (1 + math.exp(-e["target_score"])) == pytest.approx(det["detection_score"], abs=1e-3)
        else:  # another class: supported only if its sigmoid reaches conf (0.25)
            assert e["supported"] == (1 / (1 + math.exp(-e["target_score"])) >= 0.25)
    assert {e["supported"] for e in entry["explanations"]} == {True, False}


def _old(manifest: dict, change: str) -> dict:
    """``manifest`` with one field back in the unversioned form."""
    old = copy.deepcopy(manifest)
    entry = old["images"][0]
    e, d = entry["explanations"][0], entry["detections"][0]
    if change == "explanation score":
        e["score"] = e.pop("target_score")
    elif change == "explanation box":
        e["box"] = e.pop("box_index")
    elif change == "detection score":
        d["score"] = d.pop("detection_score")
    elif change == "detection index":
        d["index"] = d.pop("model_index")
    elif change == "size":
        entry["size"] = [entry["size"]["height"], entry["size"]["width"]]
    elif change == "overview boxes":
        entry["overview_map"]["boxes"] = entry["overview_map"].pop("box_indices")
    elif change == "extra at the top":
        d.update(d.pop("adapter_extra"))
    elif change == "no schema":
        old["camframe"] = old.pop("schema") and old["versions"]["camframe"]
    return old


@pytest.mark.parametrize("change", ["explanation score", "explanation box", "detection score", "detection index",
                                    "size", "overview boxes", "extra at the top", "no schema"])
def test_schema_refuses_the_old_ambiguous_form(manifest, change):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_old(manifest, change), camframe.manifest_schema())
