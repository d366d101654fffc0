"""The ``camframe`` command: bad input fails cleanly, odd images work, outputs are complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camframe import Explainer, _cli

RANDOM = ["--model", "mobilenet_v2", "--weights", "random"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camframe", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "PYTHONWARNINGS": "default"})


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if not p.is_dir()] if path.exists() else []


def error_lines(stderr: str) -> list[str]:
    """stderr without tqdm progress lines (there should be none with --quiet)."""
    return [l for l in stderr.splitlines() if l.strip() and "it/s]" not in l and "image/s]" not in l]


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, images):
    """Every bad-input case, run as ``python -m camframe explain ...`` subprocesses (3 at a time)."""
    root = tmp_path_factory.mktemp("bad")
    chelsea = str(images["chelsea"])
    text = root / "x.jpg"
    text.write_text("this is not an image\n")
    truncated = root / "half.jpg"
    data = images["bus"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    a_file = root / "a_file"
    a_file.write_text("")
    cases = {
        "missing-file": [str(root / "missing.jpg"), *RANDOM],
        "missing-glob": [str(root / "nothing-*.png"), *RANDOM],
        "not-an-image": [str(text), *RANDOM],
        "truncated-jpeg": [str(truncated), *RANDOM],
        "unknown-layer": [chelsea, *RANDOM, "--layers", "features.99"],
        "unknown-class": [chelsea, *RANDOM, "--classes", "tabby,no such class"],
        "unknown-method": [chelsea, *RANDOM, "--method", "gradcamm"],
        "unwritable-out": [chelsea, *RANDOM],
        "unknown-model": [chelsea, "--model", "no_such_model_xyz"],
    }

    def run(item):
        name, args = item
        out = a_file / "out" if name == "unwritable-out" else root / f"out-{name}"
        return name, (run_cli("explain", *args, "--quiet", "--out", str(out), cwd=root), out)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, cases.items()))


BAD = {
    "missing-file": "missing.jpg: no such file",
    "missing-glob": "matches no file",
    "not-an-image": "x.jpg: not an image",
    "truncated-jpeg": "half.jpg",
    "unknown-layer": "unknown layer 'features.99'",
    "unknown-class": "unknown class 'no such class'",
    "unknown-method": "unknown method 'gradcamm'",
    "unwritable-out": "not writable",
    "unknown-model": "no_such_model_xyz",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_cleanly(bad_inputs, case):
    proc, out = bad_inputs[case]
    assert proc.returncode != 0, proc.stdout
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, f"stderr is not one line:\n{proc.stderr}"
    assert lines[0].startswith("camframe: error: "), lines[0]
    assert BAD[case] in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert files_under(out) == [], files_under(out)


def test_unknown_layer_suggests(bad_inputs):
    proc, _ = bad_inputs["unknown-layer"]
    assert "did you mean" in proc.stderr and "features.9" in proc.stderr


# --------------------------------------------------------------------------- odd images
def _odd_images(root: Path, chelsea: Path) -> dict[str, Path]:
    base = Image.open(chelsea).convert("RGB")  # 451 x 300
    root.mkdir(parents=True, exist_ok=True)
    made = {}

    def save(name, im, **kw):
        path = root / name
        im.save(path, **kw)
        made[path.stem] = path

    save("gray.png", base.convert("L"))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    save("rgba.png", rgba)
    sixteen = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    im16 = Image.fromarray(sixteen)
    assert im16.mode.startswith("I;16")
    save("deep16.png", im16)
    save("palette.png", base.convert("P", palette=Image.ADAPTIVE, colors=64))
    save("tiny.png", base.resize((8, 8)))
    save("wide.png", base.resize((400, 20)))
    save("tall.jpg", base.resize((20, 400)))
    return made


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory, images):
    return _odd_images(tmp_path_factory.mktemp("odd") / "in", images["chelsea"])


def _check_outputs(out: Path, path: Path, entry: dict, guided: bool) -> None:
    with Image.open(path) as im:
        w, h = im.size
    assert entry["size"] == [h, w]
    (exp,) = entry["explanations"]
    files = exp["files"]
    arr = np.load(out / files["map"])
    assert arr.shape == (h, w) and arr.dtype == np.float32
    assert 0 <= arr.min() and arr.max() <= 1 and np.isfinite(arr).all()
    names = ["cam", "guided-backprop", "guided-gradcam"] if guided else ["cam"]
    assert sorted(k for k in files if k != "map") == sorted(names)
    for key in names:
        with Image.open(out / files[key]) as im:
            assert im.size == (w, h) and im.mode == "RGB", (key, im.size, im.mode)


@pytest.mark.parametrize("name", ["gray", "rgba", "deep16", "palette", "tiny", "wide", "tall"])
def test_odd_image_in_process(odd_images, tmp_path, name):
    out = tmp_path / "out"
    code = _cli.main(["explain", str(odd_images[name]), *RANDOM, "--save-maps", "--no-guided", "--quiet",
                      "--out", str(out)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["images"]
    _check_outputs(out, odd_images[name], entry, guided=False)


def test_sixteen_bit_image_uses_full_range(odd_images):
    from camframe import load_image

    a16 = load_image(odd_images["deep16"])
    a8 = load_image(odd_images["gray"])
    assert a16.dtype == np.uint8 and a16.shape == a8.shape
    assert np.abs(a16.astype(int) - a8.astype(int)).max() <= 1


def test_odd_images_subprocess_directory(odd_images, tmp_path):
    """All odd images at once (one batch, guided images too), the directory as input, through the
    real command."""
    folder = odd_images["gray"].parent
    (folder / "notes.txt").write_text("not an image; a directory input skips it")
    out = tmp_path / "out"
    proc = run_cli("explain", str(folder), *RANDOM, "--save-maps", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert error_lines(proc.stderr) == []
    manifest = json.loads((out / "manifest.json").read_text())
    paths = [Path(e["path"]).name for e in manifest["images"]]
    assert paths == sorted(p.name for p in odd_images.values())
    for entry in manifest["images"]:
        _check_outputs(out, Path(entry["path"]), entry, guided=True)


# --------------------------------------------------------------------------- inputs and outputs
@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("inputs")
    for name in ("chelsea", "coffee"):
        Image.open(images[name]).convert("RGB").resize((64, 48)).save(root / f"{name}.png")
    Image.open(images["bus"]).convert("RGB").resize((48, 64)).save(root / "bus.jpg")
    (root / "readme.txt").write_text("not an image")
    return root


def test_directory_input(small_inputs, tmp_path):
    out = tmp_path / "out"
    assert _cli.main(["explain", str(small_inputs), *RANDOM, "--no-guided", "--quiet", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(e["path"]).name for e in manifest["images"]] == ["bus.jpg", "chelsea.png", "coffee.png"]
    assert sorted(p.name for p in out.iterdir() if p.name != ".camframe") == sorted(
        ["manifest.json", "bus.cam.jpg", "chelsea.cam.jpg", "coffee.cam.jpg"])


def test_glob_input(small_inputs, tmp_path):
    out = tmp_path / "out"
    pattern = str(small_inputs / "*.png")
    assert _cli.main(["explain", pattern, *RANDOM, "--no-guided", "--quiet", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(e["path"]).name for e in manifest["images"]] == ["chelsea.png", "coffee.png"]


def test_same_stem_in_different_folders_gets_distinct_files(tmp_path, images):
    """a/x.png, b/x.png and c/x-2.png: three images, three sets of outputs, none overwritten."""
    im = Image.open(images["chelsea"]).convert("RGB").resize((32, 32))
    inputs = []
    for folder, name in (("a", "x.png"), ("b", "x.png"), ("c", "x-2.png")):
        (tmp_path / folder).mkdir()
        im.save(tmp_path / folder / name)
        inputs.append(str(tmp_path / folder / name))
    out = tmp_path / "out"
    assert _cli.main(["explain", *inputs, *RANDOM, "--no-guided", "--quiet", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    files = [f for e in manifest["images"] for x in e["explanations"] for f in x["files"].values()]
    assert len(files) == 3
    assert len(set(files)) == 3, f"outputs overwrite each other: {files}"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, images, mobilenet_weights):
    """chelsea and bus with the real weights, guided, maps saved."""
    out = tmp_path_factory.mktemp("real") / "out"
    code = _cli.main(["explain", str(images["chelsea"]), str(images["bus"]), "--model", "mobilenet_v2",
                      "--weights", mobilenet_weights, "--save-maps", "--quiet", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "manifest.json").read_text())


def test_manifest_structure(real_run, images):
    out, manifest = real_run
    assert manifest["model"] == "mobilenet_v2"
    assert manifest["adapter"] == "torchvision"
    assert manifest["method"] == "elementwise"
    assert manifest["layers"] == ["features.18"]
    assert manifest["aggregate"] in ("max", "avg")
    assert [Path(e["path"]) for e in manifest["images"]] == [images["chelsea"], images["bus"]]
    for entry, size in zip(manifest["images"], ([300, 451], [1080, 810])):
        assert entry["size"] == size
        (exp,) = entry["explanations"]
        assert set(exp) >= {"class_id", "class_name", "score", "method", "layers", "aggregate", "files"}
        assert isinstance(exp["class_id"], int) and isinstance(exp["score"], float)
        assert exp["method"] == "elementwise" and exp["layers"] == ["features.18"]
        assert exp["aggregate"] == manifest["aggregate"]
        assert set(exp["files"]) == {"cam", "guided-backprop", "guided-gradcam", "map"}
        for name in exp["files"].values():
            assert (out / name).is_file() and (out / name).stat().st_size > 0
    chelsea, bus = (e["explanations"][0] for e in manifest["images"])
    assert 281 <= chelsea["class_id"] <= 285
    assert bus["class_name"] == "minibus"
    # every file in the directory is accounted for by the manifest
    listed = {f for e in manifest["images"] for x in e["explanations"] for f in x["files"].values()}
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json", ".camframe"}


def test_manifest_scores_and_maps_match_the_api(real_run, mobilenet, images):
    out, manifest = real_run
    result = Explainer(mobilenet, guided=False)([images["chelsea"]])
    exp = manifest["images"][0]["explanations"][0]
    assert exp["class_id"] == result.targets[0].class_id
    assert exp["score"] == pytest.approx(result.targets[0].score, abs=1e-4)
    saved = np.load(out / exp["files"]["map"])
    np.testing.assert_allclose(saved, result.original()[0].numpy(), atol=1e-5)


def test_several_classes(small_inputs, tmp_path):
    out = tmp_path / "out"
    code = _cli.main(["explain", str(small_inputs / "chelsea.png"), *RANDOM, "--classes", "tabby, tiger cat",
                      "--no-guided", "--quiet", "--out", str(out)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    exps = manifest["images"][0]["explanations"]
    assert [(e["class_id"], e["class_name"]) for e in exps] == [(281, "tabby"), (282, "tiger cat")]
    names = {p.name for p in out.iterdir()}
    assert {"chelsea.tabby.cam.jpg", "chelsea.tiger_cat.cam.jpg"} <= names
    assert "chelsea.cam.jpg" not in names
    for e in exps:
        assert (out / e["files"]["cam"]).is_file()
    assert len({f for e in exps for f in e["files"].values()}) == len(exps)


def test_two_classes_file_names(small_inputs, tmp_path):
    out = tmp_path / "out"
    code = _cli.main(["explain", str(small_inputs / "chelsea.png"), str(small_inputs / "bus.jpg"), *RANDOM,
                      "--classes", "tabby,minibus", "--no-guided", "--save-maps", "--quiet", "--out", str(out)])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"manifest.json", ".camframe"} | {f"{stem}.{cls}.{kind}" for stem in ("chelsea", "bus")
                                         for cls in ("tabby", "minibus") for kind in ("cam.jpg", "cam.npy")}


@pytest.mark.needs_plugins
def test_layers_command(capsys):
    assert _cli.main(["layers", *RANDOM]) == 0
    out = capsys.readouterr().out.splitlines()
    marked = [l for l in out if l.startswith("*") and not l.startswith("* default")]
    assert len(marked) == 1 and marked[0].split()[1] == "features.18"
    assert "(1, 1280, 7, 7)" in marked[0]
    assert any(l.split()[0] == "features.17" for l in out if not l.startswith("*"))
    assert out[-1].startswith("* default layers of adapter 'torchvision'")


# --------------------------------------------------------------------------- interruption
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_leaves_no_files(small_inputs, tmp_path, monkeypatch, exc):
    calls = []
    original = Explainer.__call__

    def second_call_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc("interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Explainer, "__call__", second_call_fails)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's own file")
    argv = ["explain", str(small_inputs), *RANDOM, "--batch-size", "1", "--save-maps", "--no-guided", "--quiet",
            "--out", str(out)]
    if exc is KeyboardInterrupt:
        assert _cli.main(argv) == 130
    else:
        with pytest.raises(RuntimeError, match="interrupted"):
            _cli.main(argv)
    assert len(calls) == 2
    assert [p.name for p in files_under(out)] == ["keep.txt"]


def test_interrupted_while_writing_leaves_no_files(small_inputs, tmp_path, monkeypatch):
    """Interrupted in the middle of one image's files (the 4th file written)."""
    from camframe import _output

    calls = []
    original = _output.write_bytes

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(path, data)

    monkeypatch.setattr(_output, "write_bytes", flaky)
    out = tmp_path / "out"
    assert _cli.main(["explain", str(small_inputs), *RANDOM, "--batch-size", "1", "--quiet", "--out", str(out)]) == 130
    from camframe._pipeline import default_threads

    assert 4 <= len(calls) <= 4 + 3 * (default_threads() - 1)  # each other writer thread ends the image it is on
    assert files_under(out) == []
