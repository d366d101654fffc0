"""``camframe.ray``: a dataset explained by a pool of Ray actors gives the single-process run's files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camframe import cli as _cli
from camframe.output.journal import JOURNAL
from tinymodel import write_inputs  # a module in tests/ (on sys.path under pytest)

N = 200
ASSETS = Path(__file__).parent / "assets"
DETECTOR = ["--model", str(ASSETS / "shapes_yolo.pt"), "--save-maps"]  # the shapes YOLO: boxes, a map per box
MAP_TOLERANCE = SCORE_TOLERANCE = 1e-4  # what docs/scale.md states for other batches


def run_camframe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``camframe ARGS`` in a fresh process (its own torch threads, its own Ray)."""
    return subprocess.run([sys.executable, "-m", "camframe", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_detector_on_ray_writes_the_local_runs_bytes_and_only_camframes_lines(tmp_path):
    """``--ray`` starting its own local cluster: the same bytes as the command without it (the actors
    compute with the driver's torch threads, in its batches), and on stderr nothing of Ray's (no -v)."""
    common = ["explain", str(ASSETS / "shapes"), *DETECTOR]
    local = run_camframe(*common, "--resume", "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    start = time.monotonic()
    run = run_camframe(*common, "--ray", "--out", str(tmp_path / "ray"))
    assert run.returncode == 0, run.stderr
    print(f"camframe explain --ray on 4 images: {time.monotonic() - start:.1f} s")
    assert run.stderr == ""  # no INFO lines, no progress bars, no C++ warnings
    assert run.stdout == local.stdout.replace("local/", "ray/")  # camframe's own line
    expected = outputs(tmp_path / "local")
    assert len(expected) > 4 + 2 and any(name.endswith(".npy") for name in expected)
    assert outputs(tmp_path / "ray") == expected


def test_an_address_where_no_ray_cluster_answers_is_one_line_at_once(tmp_path):
    start = time.monotonic()
    run = run_camframe("explain", str(ASSETS / "shapes" / "shapes_000.jpg"), *DETECTOR, "--ray", "127.0.0.1:1",
                   "--out", str(tmp_path / "out"), timeout=60)
    assert time.monotonic() - start < 60
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("camframe: error: cannot connect to the Ray cluster '127.0.0.1:1': nothing "
                                 "answers at ") and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "out").exists()

    import camframe.ray

    with socket.create_server(("", 0)) as server:  # a server that speaks something else than gRPC
        def answer() -> None:
            connection, _ = server.accept()
            with connection:
                connection.recv(100)
                connection.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        threading.Thread(target=answer, daemon=True).start()
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="is not a Ray cluster"):
            camframe.ray._reachable(f"127.0.0.1:{server.getsockname()[1]}", timeout=5)
        assert time.monotonic() - start < 5


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


def test_batches_are_the_local_runs_and_other_batches_differ_within_the_stated_tolerance(cluster, tmp_path):
    """The actors explain a detector's images in the local run's batches (here 3 + 1 images): the same
    bytes. Another batch size changes the float sums (BLAS blocks by batch): maps within MAP_TOLERANCE,
    manifest numbers within SCORE_TOLERANCE or one unit of their last (rounded) digit."""
    common = ["explain", str(ASSETS / "shapes"), *DETECTOR, "--quiet"]
    runs = {}
    for name, extra in {"local": ["--batch-size", "3", "--resume"], "ray": ["--batch-size", "3", "--ray"],
                        "one": ["--batch-size", "1"]}.items():
        assert _cli.main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        runs[name] = outputs(tmp_path / name)
    assert runs["ray"] == runs["local"]

    manifests = [json.loads(runs[name]["manifest.json"]) for name in ("local", "one")]
    pairs = list(_numbers(*manifests))
    assert len(pairs) > 50
    for a, b in pairs:
        assert abs(a - b) <= max(SCORE_TOLERANCE * max(1, abs(a)), _last_digit(a), _last_digit(b)), (a, b)
    maps = [name for name in runs["one"] if name.endswith(".npy")]
    assert len(maps) > 4
    worst = max(np.abs(np.load(tmp_path / "one" / m) - np.load(tmp_path / "local" / m)).max() for m in maps)
    print(f"maps of batches of 1 and of 3: at most {worst:.2e} apart")
    assert worst <= MAP_TOLERANCE


def _numbers(a, b):
    """The pairs of numbers at the same place in two JSON values; anything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            yield from _numbers(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            yield from _numbers(x, y)
    elif isinstance(a, float) or isinstance(b, float):
        yield float(a), float(b)
    else:
        assert a == b


def _last_digit(x: float) -> float:
    """One unit of the last decimal digit ``x`` is written with (0.01 for 12.34)."""
    return 10.0 ** -len(repr(x).partition(".")[2])


def test_without_ray_the_option_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    monkeypatch.setitem(sys.modules, "camframe.ray", None)  # what an import finds where Ray is not installed
    code = _cli.main(["explain", str(image), "--model", "mobilenet_v2", "--ray", "--out", str(tmp_path / "out")])
    assert code == 2 and capsys.readouterr().err == 'camframe: error: --ray needs Ray Data: pip install "camframe[ray]"\n'
    assert not (tmp_path / "out").exists()
