"""The ``camframe`` command: bad input fails cleanly, odd images work, outputs are complete."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camframe import CamframeError, Explainer
from camframe import cli as _cli
from camframe.output import writer

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
    assert entry["size"] == {"width": w, "height": h}
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
    assert manifest["schema"] == "camframe-manifest/1" and manifest["device"] == "cpu"
    assert manifest["versions"]["torch"] == torch.__version__
    for entry, size in zip(manifest["images"], ({"width": 451, "height": 300}, {"width": 810, "height": 1080})):
        assert entry["size"] == size
        (exp,) = entry["explanations"]
        assert set(exp) >= {"class_id", "class_name", "target_score", "target_score_kind", "supported", "method",
                            "layers", "aggregate", "files"}
        assert isinstance(exp["class_id"], int) and isinstance(exp["target_score"], float)
        assert exp["target_score_kind"] == "logit" and exp["supported"] == (exp["target_score"] > 0)
        assert "box_index" not in exp and "detection_score" not in exp  # a classifier's
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
    assert exp["target_score"] == pytest.approx(result.targets[0].score, abs=1e-4)
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
    assert {"chelsea.c281-tabby.cam.jpg", "chelsea.c282-tiger_cat.cam.jpg"} <= names
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
                                         for cls in ("c281-tabby", "c654-minibus") for kind in ("cam.jpg", "cam.npy")}


@pytest.mark.needs_plugins
def test_layers_command(capsys):
    assert _cli.main(["layers", *RANDOM]) == 0
    out = capsys.readouterr().out.splitlines()
    marked = [l for l in out if l.startswith("*") and not l.startswith("* default")]
    assert len(marked) == 1 and marked[0].split()[1] == "features.18"
    assert "(1, 1280, 7, 7)" in marked[0]
    assert any(l.split()[0] == "features.17" for l in out if not l.startswith("*"))
    assert out[-1].startswith("* default layers of adapter 'torchvision'")


def _listed(out: list[str]) -> list[str]:
    """The layer names `camframe layers` printed."""
    return [l[2:].split()[0] for l in out if l.startswith(("* ", "  ")) and not l.startswith("* default")]


@pytest.mark.needs_plugins  # torchvision's mobilenet_v2
def test_layers_filters_and_presets(capsys):
    assert _cli.main(["layers", *RANDOM, "--depth", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    import torchvision

    modules = [n for n, _ in torchvision.models.mobilenet_v2().named_modules() if n]
    shallow = [n for n in modules if n.count(".") <= 1]
    assert sorted(_listed(out)) == sorted(shallow)
    assert f"({len(shallow)} of {len(modules)} layers shown)" in out
    assert _cli.main(["layers", *RANDOM, r"FEATURES\.1[78]\.CONV\.\d$"]) == 0  # case-insensitive search
    expected = [n for n in modules if re.search(r"features\.1[78]\.conv\.\d$", n)]
    assert len(expected) == 4 and sorted(_listed(capsys.readouterr().out.splitlines())) == sorted(expected)
    assert _cli.main(["layers", *RANDOM, "batchnorm", "--depth", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert _listed(out) and all("BatchNorm2d" in l for l in out if l[2:].split()[0] in _listed(out))
    assert all(n.count(".") <= 2 for n in _listed(out))
    assert _cli.main(["layers", *RANDOM, "--defaults"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:2] == ["*", "features.18"]
    assert _cli.main(["layers", "--model", str(Path(__file__).parent / "assets" / "shapes_yolo.pt"), "--defaults"]) == 0
    presets = [l for l in capsys.readouterr().out.splitlines() if l.startswith("preset ")]
    assert any(l.startswith("preset neck: model.") for l in presets)
    for bad in (["["], ["--depth", "0"]):
        assert _cli.main(["layers", *RANDOM, *bad]) == 2
        assert capsys.readouterr().err.startswith("camframe: error: ")


def test_help_lists_methods_and_presets():
    subs = {a.dest: a for a in _cli.build_parser()._subparsers._group_actions[0].choices["explain"]._actions}
    methods = subs["method"].help
    assert all(m in methods for m in ("gradcam", "elementwise (alias: hirescam)", "eigencam", "drise"))
    assert "preset" in subs["layers"].help and "camframe layers --model M" in subs["layers"].help


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


def _signalled_while_torch_imports(sig: signal.Signals) -> tuple[int, str]:
    """``python -m camframe plugins``, sent ``sig`` once torch's libraries are loaded (its import, seconds
    long, under way): exit code and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "camframe", "plugins"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(sig)
    return proc.wait(timeout=120), proc.stderr.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig,code,message", [(signal.SIGINT, 130, "camframe: interrupted"),
                                              (signal.SIGTERM, 143, "camframe: terminated")])
def test_signal_while_torch_imports_is_one_line(sig, code, message):
    assert _signalled_while_torch_imports(sig) == (code, message + "\n")


def test_the_command_entry_imports_no_torch():
    """The console script's target, ``camframe._entry:main``, can handle Ctrl-C before torch is imported."""
    scripts = (Path(__file__).parents[1] / "pyproject.toml").read_text().partition("[project.scripts]")[2]
    assert scripts.split("[")[0].split() == ["camframe", "=", '"camframe._entry:main"']
    code = ("import sys, camframe._entry; "
            "print(sorted(m for m in ('torch', 'numpy', 'camframe.cli') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout == "[]\n"


def test_interrupted_while_writing_leaves_no_files(small_inputs, tmp_path, monkeypatch):
    """Interrupted in the middle of one image's files (the 4th file written)."""
    from camframe.output import folder as _output

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
    from camframe.output.pipeline import default_threads

    assert 4 <= len(calls) <= 4 + 3 * (default_threads() - 1)  # each other writer thread ends the image it is on
    assert files_under(out) == []


# --------------------------------------------------------------------------- limits of the arguments
@pytest.mark.parametrize("command", ["explain", "evaluate"])
def test_empty_out_is_refused(small_inputs, tmp_path, monkeypatch, capsys, command):
    """``--out ""`` (an unset shell variable) would write into the current folder: one line, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert _cli.main([command, str(small_inputs), *RANDOM, "--quiet", "--out", ""]) == 2
    assert capsys.readouterr().err == ("camframe: error: --out is empty; name the output folder "
                                       "(--out . for the current one)\n")
    assert list(tmp_path.iterdir()) == []


def _address_space(limit: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.needs_plugins
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS")
@pytest.mark.parametrize("workers", ["0", "1"])
def test_input_size_beyond_memory_is_one_line(small_inputs, tmp_path, workers):
    """``--imgsz 100000`` (a 100000-pixel letterbox, 25 GB of bytes before the 100 GB float tensor): exit 2
    and one line naming the failed allocation, whether the input is made here or in a worker; the
    address space is capped at 16 GiB, so that no machine really allocates it."""
    pytest.importorskip("camframe_ultralytics")
    image = sorted(small_inputs.iterdir())[0]
    proc = subprocess.run([sys.executable, "-m", "camframe", "explain", str(image), "--model", "yolov8n.yaml",
                           "--imgsz", "100000", "--device", "cpu", "--workers", workers, "--quiet",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          preexec_fn=_address_space(16 << 30))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"camframe: error: {image}: out of memory decoding or making the model's input (")
    assert "a smaller input size" in line and not (tmp_path / "out").exists()


def test_out_of_memory_in_the_model_names_its_input(tmp_path):
    """An allocation failing in the forward (torch's CPU allocator's RuntimeError) is a CamframeError naming
    the model input's shape; any other error stays as it was."""
    from camframe.core.errors import out_of_memory

    class Hungry(torch.nn.Module):
        def __init__(self, message: str) -> None:
            super().__init__()
            self.conv, self.head, self.message = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2), message

        def forward(self, x):
            raise RuntimeError(self.message)

    failed = "[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9"
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(CamframeError, match=r"^out of memory explaining a model input of 1x3x224x224 \(\[enforce "):
        Explainer(Hungry(failed), layers=["conv"])([image])
    with pytest.raises(RuntimeError, match="^mat1 and mat2 shapes cannot be multiplied$"):
        Explainer(Hungry("mat1 and mat2 shapes cannot be multiplied"), layers=["conv"])([image])
    assert out_of_memory(MemoryError()) == "MemoryError" and out_of_memory(ValueError("bad value")) is None


ASSETS = Path(__file__).resolve().parent / "assets"
CLASHING = ["a b", "a_b", "a/b", "a.b", "圆", "方"]  # one file name each before class ids were in the names


def test_clashing_class_names_give_distinct_readable_files(tmp_path, images):
    """Names that slug alike (``a b``, ``a_b``, ``a/b``, ``a.b``) and non-Latin ones: one file per explanation,
    the class id in it, the name readable; the report links each (percent-encoded)."""
    from camframe import ClassifierAdapter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, len(CLASHING)))
    ex = Explainer(model, adapter=ClassifierAdapter(size=32, categories=CLASHING), guided=False)
    with _cli.OutputDir(tmp_path / "out", resumable=False) as out:
        manifest = writer._explain_into(out, ex, [images["chelsea"]], list(range(len(CLASHING))), None, None, True,
                                      True)
        manifest["model"] = "clashing"
        out.json("manifest.json", manifest)
        out.text("index.html", _cli.render(manifest))
    (entry,) = manifest["images"]
    names = [e["files"]["cam"] for e in entry["explanations"]]
    assert names == ["chelsea.c0-a_b.cam.jpg", "chelsea.c1-a_b.cam.jpg", "chelsea.c2-a_b.cam.jpg",
                     "chelsea.c3-a_b.cam.jpg", "chelsea.c4-圆.cam.jpg", "chelsea.c5-方.cam.jpg"]
    maps = [np.load(tmp_path / "out" / e["files"]["map"]) for e in entry["explanations"]]
    assert len({m.tobytes() for m in maps}) == len(CLASHING)  # six files, six different maps
    page = (tmp_path / "out" / "index.html").read_text()
    assert 'src="./chelsea.c4-%E5%9C%86.cam.jpg"' in page and "圆" in page


@pytest.mark.needs_plugins
def test_clashing_class_names_give_distinct_files_per_box(tmp_path):
    """A detector whose classes are named ``a b``, ``a_b``, ``a/b`` and ``a.b``: four files per box, none lost."""
    import camframe

    yolo = camframe.load_model(str(ASSETS / "shapes_yolo.pt"))
    yolo.names = dict(enumerate(CLASHING[:4]))
    ex = Explainer(yolo, guided=False)
    with _cli.OutputDir(tmp_path / "out") as out:
        manifest = writer._explain_into(out, ex, [ASSETS / "shapes" / "shapes_000.jpg"], [0, 1, 2, 3],
                                      _cli.select_boxes(ex.adapter, "top:2"), None, False, True)
        out.json("manifest.json", {**manifest, "model": "shapes_yolo.pt"})  # valid against the schema (conftest)
    (entry,) = manifest["images"]
    files = [e["files"]["cam"] for e in entry["explanations"]]
    assert files == [f"shapes_000.box{k}.c{c}-a_b.cam.jpg" for k in (0, 1) for c in range(4)]
    assert {p.name for p in (tmp_path / "out").glob("*.box*.cam.jpg")} == set(files)
