"""``camframe.ray``: a dataset explained by a pool of Ray actors gives the single-process run's files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camframe import _cli
from camframe._journal import JOURNAL
from tinymodel import write_inputs  # a module in tests/ (on sys.path under pytest)

N = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local 2-CPU Ray cluster whose workers can import the seeded tiny model ``tinymod:tiny``; and
    N tiny random pictures."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (make setup installs it: camframe[ray])")
    root = tmp_path_factory.mktemp("ray")
    write_inputs(root, N, (12, 16))
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), saved) if p)  # the workers inherit it
    sys.path.insert(0, str(root))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield root
    finally:
        ray.shutdown()
        sys.path.remove(str(root))
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_actors_write_the_single_process_runs_files_and_resume(cluster, tmp_path):
    common = ["--model", "tinymod:tiny", "--no-guided", "--batch-size", "16", "--quiet"]
    single = tmp_path / "single"
    assert _cli.main(["explain", str(cluster / "in"), *common, "--workers", "0", "--resume", "--out", str(single)]) == 0
    expected = outputs(single)
    assert len(expected) == N + 2  # a picture per image, manifest.json, journal.jsonl

    import camframe.ray

    out = tmp_path / "ray"
    paths = sorted(str(p) for p in (cluster / "in").glob("*.png"))
    manifest = camframe.ray.explain(paths, out, model="tinymod:tiny", guided=False, actors=2, batch_size=16)
    assert outputs(out) == expected  # byte for byte: pictures, manifest (in input order) and journal
    assert manifest == json.loads(expected["manifest.json"])
    assert not (out / ".camframe" / "stage-resume").exists()

    # the command line, resuming: the journal's records are reused, the one tampered picture redone
    (out / "im007.cam.jpg").write_bytes(b"not the picture")
    assert _cli.main(["explain", str(cluster / "in"), *common, "--ray", "--out", str(out)]) == 0
    assert outputs(out) == expected
    assert len((out / JOURNAL).read_text().splitlines()) == N


def test_without_ray_the_option_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    monkeypatch.setitem(sys.modules, "camframe.ray", None)  # what an import finds where Ray is not installed
    code = _cli.main(["explain", str(image), "--model", "mobilenet_v2", "--ray", "--out", str(tmp_path / "out")])
    assert code == 2 and capsys.readouterr().err == 'camframe: error: --ray needs Ray Data: pip install "camframe[ray]"\n'
    assert not (tmp_path / "out").exists()
