"""The streaming pipeline: worker processes change nothing in the outputs, a bad image mid-run rolls
back, records come in input order once their files are written, devices and half precision, flat memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from camframe import CamframeError, Explainer
from camframe import cli as _cli
from camframe.output import writer
from camframe.core import validate as _validate
from camframe.output.folder import OutputDir
from camframe.output.pipeline import Writer, explain_stream, record_files

NAMES = ("astronaut", "bus", "chelsea", "coffee")


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".camframe" not in p.parts}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, images) -> Path:
    """Five photos of different sizes and formats (a-e: the order the folder is read in)."""
    root = tmp_path_factory.mktemp("inputs")
    for k, name in enumerate(NAMES):
        im = Image.open(images[name]).convert("RGB")
        im.thumbnail((120 - 9 * k, 120 - 9 * k))
        im.save(root / f"{'abcd'[k]}_{name}.{'png' if k % 2 else 'jpg'}")
    Image.open(images["chelsea"]).convert("RGB").resize((90, 70)).transpose(Image.FLIP_LEFT_RIGHT).save(
        root / "e_flipped.jpg")
    return root


def explain(inputs: Path, out: Path, *extra: str, weights: str) -> int:
    return _cli.main(["explain", str(inputs), "--model", "mobilenet_v2", "--weights", weights, "--batch-size", "3",
                      "--save-maps", "--quiet", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def in_process(inputs, mobilenet_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w0") / "out"
    assert explain(inputs, out, "--workers", "0", weights=mobilenet_weights) == 0
    return out


def test_workers_give_byte_identical_outputs(inputs, in_process, mobilenet_weights, tmp_path):
    out = tmp_path / "out"
    assert explain(inputs, out, "--workers", "2", weights=mobilenet_weights) == 0
    assert snapshot(out) == snapshot(in_process)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(e["path"]).name for e in manifest["images"]] == sorted(p.name for p in inputs.iterdir())
    kinds = {k for e in manifest["images"] for x in e["explanations"] for k in x["files"]}
    assert kinds == {"cam", "guided-backprop", "guided-gradcam", "map"}
    assert json.loads((out / ".camframe" / "run.json").read_text())["files"] == sorted(snapshot(out))


def test_corrupt_image_mid_run_rolls_back(inputs, in_process, mobilenet_weights, tmp_path, capfd):
    """A file whose header is fine but whose data is cut short fails in a worker, after earlier batches
    were written: one line, exit 2, OUT as it was."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in inputs.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    data = (inputs / "e_flipped.jpg").read_bytes()
    (folder / "e_flipped.jpg").write_bytes(data[:len(data) // 3])
    out = tmp_path / "out"
    (tmp_path / "out").mkdir()
    for name, data in snapshot(in_process).items():
        (out / name).write_bytes(data)
    before = snapshot(out)
    capfd.readouterr()
    assert explain(folder, out, "--workers", "2", "--overwrite", weights=mobilenet_weights) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("camframe: error: ") and "e_flipped.jpg: cannot decode" in err[0], err
    assert snapshot(out) == before
    assert not list((out / ".camframe").glob("stage-*"))


def test_records_come_in_order_once_their_files_are_written(inputs, mobilenet, tmp_path):
    """What a journal can rely on: each record, in input order, lists files that are already written."""
    paths = sorted(inputs.iterdir())
    ex = Explainer(mobilenet, guided=False)
    seen = []
    with OutputDir(tmp_path / "out") as out:
        def write(result, i, path, image):
            time.sleep(0.05 * (i == 0))  # the first image of each batch finishes last
            name = out.image(f"{path.stem}.jpg", image)
            return {"path": str(path), "explanations": [{"files": {"cam": name}}]}

        for record in explain_stream(ex, paths, write, batch_size=3, workers=1, threads=3):
            assert all((out._stage / name).is_file() for name in record_files(record))
            seen.append(Path(record["path"]))
    assert seen == paths
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jpg")) == sorted(f"{p.stem}.jpg" for p in paths)


def test_writer_keeps_submission_order_and_bound():
    running, peak, lock = [0], [0], threading.Lock()

    def job(k):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 * (5 - k % 5))
        with lock:
            running[0] -= 1
        return k

    with Writer(threads=4, pending=3) as writer:
        done = [r for k in range(12) for r in writer.submit(job, k)]
        assert len(done) == 12 - 3  # at most 3 wait or run
        done += list(writer.drain())
    assert done == list(range(12)) and peak[0] <= 4


def test_device_auto_prefers_cuda_then_mps(monkeypatch):
    assert _cli.build_parser().parse_args(["explain", "x.jpg", "--model", "m", "--out", "o"]).device == "auto"
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert _validate.device("auto") == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert _validate.device("auto") == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert _validate.device("auto") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _validate.device("auto") == "cuda"


def test_half_on_cpu_is_refused(inputs, mobilenet_weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert explain(inputs, out, "--device", "cpu", "--half", weights=mobilenet_weights) == 2
    assert capsys.readouterr().err.strip() == ("camframe: error: half precision (--half) needs a GPU (cuda or mps); "
                                               "the model is on cpu")
    assert not out.exists()


def test_negative_workers_refused(inputs, tmp_path, capsys):
    assert _cli.main(["explain", str(inputs), "--model", "mobilenet_v2", "--weights", "random", "--workers", "-1",
                      "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "camframe: error: --workers must be 0 or more"


_MEMORY = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    import numpy as np, torch
    from PIL import Image
    from camframe import ClassifierAdapter, Explainer
    from camframe.output import writer
    from camframe.output.folder import OutputDir

    root = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    paths = []
    for k in range(2200):
        paths.append(root / f"{k:04d}.png")
        Image.fromarray(np.roll(tile, k, axis=1)).save(paths[-1], compress_level=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    ex = Explainer(model, layers=["3"], adapter=ClassifierAdapter(size=32), guided=False)
    for n, name in ((200, "a"), (2000, "b")):
        with OutputDir(root / name) as out:
            writer._explain_into(out, ex, paths[-n:], None, None, 16, False, True, 1)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_memory_is_flat_in_the_number_of_images(tmp_path):
    """Peak RSS after 2,000 more images (128 x 128: holding them all would take 98 MB, their full-size maps
    131 MB) within 10 % of the peak after 200."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    after_200, after_2200 = map(int, proc.stdout.split())
    assert after_2200 <= 1.1 * after_200, (after_200, after_2200)
    assert len(list((tmp_path / "b").glob("*.cam.jpg"))) == 2000


_FORK_AFTER_OPENCV = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import cv2, numpy as np
    from PIL import Image
    from camframe.output.pipeline import images

    path = Path(sys.argv[1])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    cv2.setNumThreads(2)
    cv2.resize(np.ones((3000, 3000, 3), np.uint8), (2000, 2000))  # OpenCV's thread pool runs
    time.sleep(1)  # and its threads go idle, waiting on the pool's condition variable
    print([p.name for p, _ in images([path], workers=1)], cv2.getNumThreads())
""")


def test_workers_fork_after_opencv_used_its_thread_pool(tmp_path):
    """Workers forked after this process ran OpenCV on several threads decode (they hung in
    ``cv2.setNumThreads``, destroying a pool inherited with its idle threads' waits), and OpenCV's
    thread count here is as before."""
    proc = subprocess.run([sys.executable, "-c", _FORK_AFTER_OPENCV, str(tmp_path / "a.png")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["['a.png']", "2"]


def _detector(spec: str) -> Explainer:
    from camframe import load_model

    if spec.endswith(".pt"):
        pytest.importorskip("ultralytics")
        return Explainer(load_model(str(Path(__file__).parent / "assets" / spec)))
    if spec == "mtcnn":
        return Explainer(load_model(spec), options={"conf": 0.0})
    torch.manual_seed(0)
    return Explainer(load_model(spec, "random"), options={"conf": 0.0, "max_det": 3})


@pytest.mark.needs_plugins
@pytest.mark.parametrize("spec", ["shapes_yolo.pt", "fasterrcnn_mobilenet_v3_large_320_fpn", "mtcnn"])
def test_detectors_preprocess_in_workers_as_in_process(spec, images):
    """Each built-in detector family's ``preprocessor``, run in a worker process, gives the boxes and maps
    that the adapter's ``preprocess`` gives in this one, on images where it finds something (faces for MTCNN)."""
    if spec == "mtcnn":
        pytest.importorskip("camframe_mtcnn")
        paths = [images["astronaut"], images["zidane"]]
    else:
        paths = sorted((Path(__file__).parent / "assets" / "shapes").glob("*.jpg"))[:2]
    ex = _detector(spec)
    with ex:
        direct = ex([str(p) for p in paths], boxes="top:2")
        streamed = list(explain_stream(ex, paths, lambda result, i, path, image: result, boxes="top:2", batch_size=2,
                                       workers=1, threads=0))
    assert len(streamed) == 2 and streamed[0] is streamed[1]  # one batch of two images
    assert sorted({t.image for t in direct.targets}) == [0, 1]  # something found in each image
    assert torch.equal(streamed[0].inputs, direct.inputs)
    assert [(t.image, t.detection.box) for t in streamed[0].targets] == [(t.image, t.detection.box)
                                                                         for t in direct.targets]
    assert torch.equal(streamed[0].maps, direct.maps) and bool((direct.maps > 0).any())


def test_half_path_keeps_maps_in_float32_and_close(monkeypatch, mobilenet, images):
    """The mixed-precision path, exercised with CPU bfloat16 autocast (the command refuses it on the CPU):
    float32 maps that agree with the full-precision ones, and the same top-1 class."""
    from camframe.engine import explainer as _explainer

    monkeypatch.setattr(_explainer, "_half_dtype", lambda device: torch.bfloat16)
    full = Explainer(mobilenet, guided=False)([str(images["chelsea"])])
    half = Explainer(mobilenet, guided=False, half=True)([str(images["chelsea"])])
    assert half.maps.dtype == torch.float32 and half.targets[0].class_id == full.targets[0].class_id
    assert torch.corrcoef(torch.stack([half.maps.flatten(), full.maps.flatten()]))[0, 1] > 0.95
    assert abs(half.targets[0].score - full.targets[0].score) < 0.05 * abs(full.targets[0].score)


def test_spawned_workers_get_a_picklable_preprocessor_or_one_line(monkeypatch, mobilenet):
    """Where workers are spawned (not Linux), the preprocessor is pickled: the classifier's binds no hooked
    model; one that cannot be pickled is a one-line error before any worker starts."""
    from camframe.output import pipeline as _pipeline

    monkeypatch.setattr(_pipeline.sys, "platform", "darwin")
    with Explainer(mobilenet, guided=False) as ex:
        assert list(_pipeline.batches([], 1, ex.adapter.preprocessor(ex.model), 1)) == []
        with pytest.raises(CamframeError, match=r"cannot be sent to worker processes here \(.*\); use --workers 0"):
            next(_pipeline.batches([Path("x.jpg")], 1, lambda images: ex.preprocess(images), 1))


@pytest.mark.parametrize("cores, device, expected", [(2, "cpu", 0), (1, "cpu", 0), (2, "cuda", 1), (1, "cuda", 1),
                                                     (4, "cpu", 3), (16, "cpu", 4), (16, "cuda", 4)])
def test_default_workers(monkeypatch, cores, device, expected):
    """No decoding process beside a CPU model on 2 cores (it only slows the model's threads there)."""
    from camframe.output import pipeline as _pipeline

    monkeypatch.setattr(_pipeline.os, "cpu_count", lambda: cores)
    assert _pipeline.default_workers(device) == expected


def test_writer_threads_run_torch_on_one_thread():
    """Writers' torch ops do not start thread teams of their own beside the model's; the caller's
    thread count is untouched."""
    before = torch.get_num_threads()
    with Writer(2, 4) as writer:
        seen = list(writer.submit(torch.get_num_threads)) + list(writer.drain())
    assert seen == [1]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("detector, device, expected", [(False, "cpu", 8), (True, "cpu", 1), (True, "cuda", 8),
                                                        (False, "cuda", 8)])
def test_default_batch_size(detector, device, expected):
    """One image per forward pass for a detector on the CPU: each round of box targets is a backward over
    the whole batch."""
    from types import SimpleNamespace

    from camframe import Adapter
    from camframe.adapters.detector import DetectorAdapter
    from camframe.output.pipeline import default_batch_size

    adapter = (DetectorAdapter if detector else Adapter)()
    assert default_batch_size(SimpleNamespace(adapter=adapter, device=torch.device(device))) == expected


def test_writing_leaves_the_result_as_it_was(tmp_path):
    """An image of exactly the model's input size maps onto itself without a resize: its guided pictures
    must still be made from a copy, not by working on the ``Result``'s own gradients."""
    import numpy as np

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    image = (np.random.default_rng(0).random((224, 224, 3)) * 255).astype(np.uint8)
    ex = Explainer(model, layers=["0"], guided=True)
    result = ex([image])
    guided, guided_gradcam = result.guided.clone(), result.guided_gradcam.clone()
    with OutputDir(tmp_path / "out", overwrite=True) as out:
        entry = writer._write_image(out, False, ex, result, 0, Path("im.png"), image, "im", False)
    assert set(entry["explanations"][0]["files"]) == {"cam", "guided-backprop", "guided-gradcam"}
    assert torch.equal(result.guided, guided) and torch.equal(result.guided_gradcam, guided_gradcam)


def _running_with(text: str) -> list[int]:
    """The processes (this one aside) whose command line mentions ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int(proc.name) != os.getpid() and text in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _gone_within(text: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running_with(text):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def many(inputs, tmp_path_factory) -> Path:
    """30 small images: a run killed at its second file still has workers decoding ahead."""
    root = tmp_path_factory.mktemp("many")
    for k, path in enumerate(sorted(inputs.iterdir()) * 6):
        Image.open(path).convert("RGB").resize((40, 32)).save(root / f"{k:02d}.png")
    return root


def _signalled(inputs: Path, out: Path, kill_at: str) -> tuple[int, str]:
    """``camframe explain --workers 2`` as the leader of its own process group, signalled at ``kill_at``:
    its exit code and stderr, once it has ended (not once every process holding its stderr has)."""
    env = {**os.environ, "CAMFRAME_TEST_KILL_AT": kill_at}
    with open(out.parent / f"{out.name}.stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "camframe", "explain", str(inputs), "--model", "mobilenet_v2",
                                 "--weights", "random", "--no-guided", "--batch-size", "1", "--workers", "2",
                                 "--quiet", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        code = proc.wait(timeout=300)
        err.seek(0)
        return code, err.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_run_leaves_no_worker_and_a_rerun_succeeds(many, tmp_path, capsys):
    """SIGKILL mid-run (the second file staged): the decoding workers die with the run at once (torch's
    own watchdog would take 5 s and holds on while a batch decodes), none holds the lock, and a rerun
    into the folder at once succeeds, silently."""
    out = tmp_path / "killed-out"
    code, err = _signalled(many, out, "staged#2:SIGKILL")
    assert code == -signal.SIGKILL, err
    assert _gone_within(str(out), 2.0), f"workers left running: {_running_with(str(out))}"
    capsys.readouterr()
    assert _cli.main(["explain", str(many), "--model", "mobilenet_v2", "--weights", "random", "--no-guided",
                      "--batch-size", "1", "--workers", "2", "--quiet", "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert len(json.loads((out / "manifest.json").read_text())["images"]) == 30


# (the signal, "-" for the whole process group, exit code, the one line on stderr)
WORKER_SIGNALS = [("-SIGTERM", 143, "camframe: terminated"), ("SIGTERM", 143, "camframe: terminated"),
                  ("-SIGINT", 130, "camframe: interrupted")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig,code,message", WORKER_SIGNALS, ids=[s for s, *_ in WORKER_SIGNALS])
def test_signals_with_workers_exit_as_documented(many, tmp_path, sig, code, message):
    """SIGTERM or SIGINT, to the command or to its whole process group (workers included, before they
    left it), mid-run with --workers 2: the documented exit status and one line, no traceback, no
    process left, no folder."""
    out = tmp_path / "out"
    assert _signalled(many, out, f"staged#2:{sig}") == (code, message + "\n")
    assert _gone_within(str(out), 2.0), f"workers left running: {_running_with(str(out))}"
    assert not out.exists()
