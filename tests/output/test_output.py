"""The output transaction (docs/reliability.md): a run into ``--out`` completes, or leaves it as it was."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camframe import CamframeError, Explainer
from camframe import cli as _cli
from camframe.output.folder import OutputDir

RANDOM = ["--model", "mobilenet_v2", "--weights", "random"]
KILL_AT = "CAMFRAME_TEST_KILL_AT"


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` by relative path, but the lock (it holds the last run's pid)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).as_posix() != ".camframe/lock"}


def visible(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.name != ".camframe"}


def default_sigint() -> None:
    """Give a child the default SIGINT: a job started in the background (as CI may run the tests)
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_in_child(out: Path, files: dict[str, str], kill_at: str | None = None) -> int:
    """Write ``files`` through an OutputDir in a forked process; its exit code (minus the signal if killed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the tests run with SIGINT ignored
            os.environ.pop(KILL_AT, None)
            if kill_at:
                os.environ[KILL_AT] = kill_at
            with OutputDir(out) as o:
                for name, text in files.items():
                    o.text(name, text)
            code = 0
        except KeyboardInterrupt:
            code = 130
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def next_run_fails(out: Path) -> None:
    """A run that recovers ``out`` (as every run does first), then fails."""
    with pytest.raises(RuntimeError, match="next run"):
        with OutputDir(out):
            raise RuntimeError("next run fails")


def run_files(generation: str, names: list[str]) -> dict[str, str]:
    files = {n: f"{generation} {n}" for n in names}
    files["manifest.json"] = json.dumps({"generation": generation, "files": names})
    return files


OLD = {**run_files("old", ["a.txt", "b.txt", "gone.txt"]), "index.html": "old index"}
NEW = run_files("new", ["a.txt", "b.txt", "c.txt"])


def assert_manifest_consistent(out: Path) -> None:
    """Whenever manifest.json is there, every file it lists is there, of the same run."""
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        for name in manifest["files"]:
            assert (out / name).read_text() == f"{manifest['generation']} {name}"


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Snapshots of a folder after the old run, and after the old then the new run, uninterrupted."""
    root = tmp_path_factory.mktemp("reference")
    assert run_in_child(root / "old", OLD) == 0
    assert run_in_child(root / "new", OLD) == 0 and run_in_child(root / "new", NEW) == 0
    return {"old": snapshot(root / "old"), "new": snapshot(root / "new")}


# (where the rerun is killed, by which signal, its exit code, which run the folder holds afterwards)
KILLS = [
    ("staged#2", "SIGKILL", -9, "old"),
    ("staged#2", "SIGINT", 130, "old"),
    ("staged#2", "SIGTERM", -15, "old"),
    ("record", "SIGKILL", -9, "new"),
    ("old-out#1", "SIGKILL", -9, "new"),  # the old manifest is out
    ("old-out#3", "SIGKILL", -9, "new"),
    ("new-in#1", "SIGKILL", -9, "new"),
    ("new-in#4", "SIGKILL", -9, "new"),  # the new manifest is in, run.json not yet written
    ("run-json", "SIGKILL", -9, "new"),
    ("old-out#2", "SIGINT", 130, "new"),  # SIGINT and SIGTERM wait for the commit to end
    ("new-in#2", "SIGTERM", -15, "new"),
]


@pytest.mark.parametrize("point,sig,code,survivor", KILLS, ids=[f"{p}-{s}" for p, s, *_ in KILLS])
def test_killed_rerun_leaves_the_old_run_or_the_new_one(tmp_path, references, point, sig, code, survivor):
    out = tmp_path / "out"
    assert run_in_child(out, OLD) == 0
    assert run_in_child(out, NEW, f"{point}:{sig}") == code
    assert_manifest_consistent(out)
    next_run_fails(out)  # recovery: stage leftovers removed, a commit under way finished
    assert snapshot(out) == references[survivor]


def test_user_files_are_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("the user's own manifest")
    with pytest.raises(CamframeError, match=r"manifest.json: exists and is not from an earlier") as refused:
        with OutputDir(out) as o:
            o.text("x.cam.jpg", "x")
            o.json("manifest.json", {"files": ["x.cam.jpg"]})
    assert "--overwrite" in str(refused.value)
    assert snapshot(out) == {"manifest.json": b"the user's own manifest"}
    with OutputDir(out, overwrite=True) as o:
        o.json("manifest.json", {"files": []})
    assert json.loads((out / "manifest.json").read_text()) == {"files": []}
    assert visible(out) == {"manifest.json"}


@pytest.mark.legacy_manifest
def test_older_camframe_folder_is_replaced_as_a_unit(tmp_path):
    """A folder written before run.json existed: its manifest, report and listed files are camframe's."""
    out = tmp_path / "out"
    out.mkdir()
    entry = {"path": "x.png", "explanations": [{"files": {"cam": "x.cam.jpg", "map": "x.cam.npy"}}]}
    (out / "manifest.json").write_text(json.dumps({"camframe": "0.1.0", "images": [entry]}))
    for name in ("index.html", "x.cam.jpg", "x.cam.npy", "notes.txt"):
        (out / name).write_text(name)
    with OutputDir(out) as o:
        o.text("y.cam.jpg", "y")
        o.json("manifest.json", {"camframe": "0.1.0", "images": []})
    assert visible(out) == {"y.cam.jpg", "manifest.json", "notes.txt"}


def test_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with OutputDir(tmp_path / "out") as o:
            picture = np.zeros((4, 4, 3), np.uint8)
            names = [o.text("a.txt", "a"), o.array("m.npy", np.zeros(3)), o.image("p.jpg", picture)]
    finally:
        os.umask(previous)
    assert {n: stat.S_IMODE((tmp_path / "out" / n).stat().st_mode) for n in names} == dict.fromkeys(names, 0o640)


# --------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, images) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    for name in ("chelsea", "coffee", "astronaut"):
        Image.open(images[name]).convert("RGB").resize((48, 40)).save(root / f"{name}.png")
    return root


def explain(inputs: Path, out: Path, *extra: str) -> int:
    return _cli.main(["explain", str(inputs), *RANDOM, "--no-guided", "--batch-size", "1", "--quiet",
                      "--out", str(out), *extra])


@pytest.fixture(scope="module")
def first_run(inputs, tmp_path_factory) -> Path:
    """A complete run with gradcam, raw maps and the report."""
    out = tmp_path_factory.mktemp("first") / "out"
    assert explain(inputs, out, "--method", "gradcam", "--save-maps", "--report") == 0
    return out


def assert_complete(out: Path, method: str) -> None:
    """The folder holds one complete run: the manifest's files, all there, and nothing else."""
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f for e in manifest["images"] for x in e["explanations"] for f in x["files"].values()}
    assert {x["method"] for e in manifest["images"] for x in e["explanations"]} == {method}
    assert visible(out) == listed | {"manifest.json"}
    assert set(json.loads((out / ".camframe" / "run.json").read_text())["files"]) == visible(out)


def test_rerun_replaces_the_previous_run_as_a_unit(inputs, first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    assert explain(inputs, out, "--method", "elementwise") == 0
    assert not list(out.glob("*.npy")) and not (out / "index.html").exists()
    assert_complete(out, "elementwise")


def test_failure_mid_run_leaves_out_byte_identical(inputs, first_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    before = snapshot(out)
    calls = []
    original = Explainer.__call__

    def bad_second_image(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise CamframeError("coffee.png: cannot decode image")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Explainer, "__call__", bad_second_image)
    assert explain(inputs, out, "--method", "gradcam", "--save-maps", "--report") == 2
    assert "coffee.png: cannot decode image" in capsys.readouterr().err
    assert snapshot(out) == before


def test_failed_run_removes_the_folders_it_created(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(Explainer, "__call__", lambda *a, **k: (_ for _ in ()).throw(CamframeError("bad image")))
    assert explain(inputs, tmp_path / "new" / "deeper" / "out") == 2
    assert list(tmp_path.iterdir()) == []


def test_failed_evaluate_leaves_no_folder_and_no_empty_log(inputs, tmp_path, monkeypatch):
    """The resume log lives outside the transaction; a run that failed before logging anything removes it."""
    monkeypatch.setattr(Explainer, "__call__", lambda *a, **k: (_ for _ in ()).throw(CamframeError("bad image")))
    code = _cli.main(["evaluate", str(inputs), *RANDOM, "--steps", "2", "--quiet", "--out", str(tmp_path / "eval")])
    assert code == 2
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_says_so(inputs, tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("a file")
    assert explain(inputs, target) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"camframe: error: {target}: --out is a file, not a folder"
    assert target.read_text() == "a file"


def test_concurrent_run_fails_fast_naming_the_other(inputs, tmp_path, capsys):
    """A forked process holds --out (mid-run); the command fails at once, the other run commits intact."""
    out = tmp_path / "out"
    ready, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with OutputDir(out) as o:
                o.text("a.txt", "first run")
                os.write(ready[1], b"1")
                os.read(go[0], 1)
                o.json("manifest.json", {"files": ["a.txt"]})
            code = 0
        finally:
            os._exit(code)
    os.read(ready[0], 1)
    try:
        code = explain(inputs, out)
    finally:
        os.write(go[1], b"1")
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code == 2 and status == 0
    err = capsys.readouterr().err.strip()
    assert err == f"camframe: error: {out}: another camframe run (pid {pid}) is writing here"
    assert visible(out) == {"a.txt", "manifest.json"} and (out / "a.txt").read_text() == "first run"
    assert json.loads((out / ".camframe" / "run.json").read_text())["files"] == ["a.txt", "manifest.json"]


def test_a_forked_child_does_not_hold_the_lock(tmp_path):
    """A process forked during a run (a decoding worker) closes the lock it inherited: once the run ends,
    the next run takes the lock while the child still lives. The child closes it in its at-fork hook, when
    it first runs: the run waits for that, as a run waits for its workers' batches."""
    out = tmp_path / "out"
    ready, go = os.pipe(), os.pipe()
    with OutputDir(out) as o:
        o.text("a.txt", "first run")
        pid = os.fork()
        if pid == 0:
            os.write(ready[1], b"1")
            os.read(go[0], 1)
            os._exit(0 if o._lock_fd is None else 1)
        os.read(ready[0], 1)
    try:
        with OutputDir(out) as o:
            o.text("a.txt", "second run")
    finally:
        os.write(go[1], b"1")
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert status == 0 and (out / "a.txt").read_text() == "second run"


def test_lock_of_a_gone_run_is_taken_over(inputs, tmp_path, capsys):
    """A lock held by a process that a dead run left behind (its pid in the file) is taken over, with one line."""
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".camframe").mkdir(parents=True)
    ready, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        fd = os.open(out / ".camframe" / "lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{dead.pid}\n".encode())
        os.write(ready[1], b"1")
        os.read(go[0], 1)
        os._exit(0)
    os.read(ready[0], 1)
    try:
        code = explain(inputs, out)
    finally:
        os.write(go[1], b"1")
        os.waitpid(pid, 0)
    assert code == 0
    assert capsys.readouterr().err.strip() == (f"camframe: warning: {out}: took over the lock of camframe run "
                                               f"{dead.pid}, which is gone (a process it left held it)")
    assert "manifest.json" in visible(out)


# (where the command is signalled, by which signal, exit code, message, whether the rerun completed)
SIGNALLED = [
    ("staged#3", "SIGINT", 130, "camframe: interrupted", False),
    ("staged#3", "SIGTERM", 143, "camframe: terminated", False),
    ("old-out#2", "SIGTERM", 143, "camframe: terminated", True),  # held until the commit ends
    ("new-in#2", "SIGKILL", -9, "", True),  # finished by the next run
]


@pytest.fixture(scope="module")
def signalled(inputs, first_run, tmp_path_factory):
    """Reruns (elementwise, no maps, no report) of ``first_run``'s folder, as subprocesses, signalled."""
    root = tmp_path_factory.mktemp("signalled")

    def rerun(case):
        point, sig, *_ = case
        out = root / f"{point}-{sig}"
        shutil.copytree(first_run, out)
        env = {**os.environ, KILL_AT: f"{point}:{sig}"}
        proc = subprocess.run([sys.executable, "-m", "camframe", "explain", str(inputs), *RANDOM, "--no-guided",
                               "--batch-size", "1", "--quiet", "--out", str(out)],
                              capture_output=True, text=True, env=env, timeout=600, preexec_fn=default_sigint)
        return out, proc

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SIGNALLED, pool.map(rerun, SIGNALLED)))


@pytest.mark.parametrize("case", SIGNALLED, ids=[f"{p}-{s}" for p, s, *_ in SIGNALLED])
def test_signalled_command(signalled, first_run, case):
    _, _, code, message, completed = case
    out, proc = signalled[case]
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip() == message
    next_run_fails(out)
    if completed:
        assert_complete(out, "elementwise")
    else:
        assert snapshot(out) == snapshot(first_run)
