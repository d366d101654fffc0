"""``camframe explain --resume``: the journal of finished images, and a run that continues after a kill."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from camframe import cli as _cli
from camframe.output import writer
from camframe.output.journal import JOURNAL, Resume
from tinymodel import write_inputs  # a module in tests/ (on sys.path under pytest)

N = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """40 small random pictures in ``in/`` and a seeded tiny model, ``tinymod:tiny``, importable."""
    root = tmp_path_factory.mktemp("resume")
    write_inputs(root, N, (16, 20))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["explain", str(root / "in"), "--model", "tinymod:tiny", "--workers", "0", "--batch-size", "4",
            "--quiet", "--out", str(out), *extra]


def outputs(out: Path) -> dict[str, bytes]:
    """The run's visible files."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]


def staged_records(out: Path) -> list[dict]:
    shards = sorted((out / ".camframe" / "stage-resume" / "journal").glob("*.jsonl"))
    return [json.loads(line) for shard in shards for line in shard.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(setup, tmp_path_factory) -> Path:
    """An uninterrupted ``--resume`` run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert _cli.main(argv(setup, out, "--resume")) == 0
    return out


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[str, bytes]:
    return outputs(reference_run)


def fail_after(monkeypatch, n: int) -> None:
    """Make the run fail once ``n`` images are journaled (an interruption, in this process)."""
    add = Resume.add

    def counting(self, *args):
        if len(staged_records(self.out.path)) >= n:
            raise KeyboardInterrupt
        add(self, *args)

    monkeypatch.setattr(Resume, "add", counting)


def test_killed_run_resumes_to_the_same_outputs_doing_no_image_twice(setup, reference, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(setup), os.environ.get("PYTHONPATH", "")]),
           "CAMFRAME_TEST_KILL_AT": "journaled#20"}
    run = subprocess.run([sys.executable, "-m", "camframe", *argv(setup, out, "--resume")], env=env, cwd=setup,
                         capture_output=True, text=True)
    assert run.returncode == -9, run.stderr
    assert not (out / "manifest.json").exists()  # nothing committed: the images so far wait in the stage
    assert len(staged_records(out)) == 20

    assert _cli.main(argv(setup, out, "--resume")) == 0
    assert outputs(out) == reference  # manifest, pictures and journal, byte for byte
    records = journal(out)
    assert len(records) == N and len({r["path"] for r in records}) == N  # each image done once
    assert not (out / ".camframe" / "stage-resume").exists()


def test_a_changed_option_reuses_no_record(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        fail_after(m, 12)
        assert _cli.main(argv(setup, out, "--resume")) == 130
    before = {r["key"] for r in staged_records(out)}
    assert len(before) == 12 and not (out / "manifest.json").exists()

    assert _cli.main(argv(setup, out, "--resume", "--method", "gradcam")) == 0
    records = journal(out)
    assert len(records) == N and not before & {r["key"] for r in records}  # all 40 redone under the new key
    manifest = json.loads((out / "manifest.json").read_text())
    assert {x["method"] for e in manifest["images"] for x in e["explanations"]} == {"gradcam"}


def test_a_tampered_or_missing_file_is_redone(setup, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        fail_after(m, 10)
        assert _cli.main(argv(setup, out, "--resume")) == 130
    stage = out / ".camframe" / "stage-resume"
    with open(stage / "im003.cam.jpg", "ab") as f:
        f.write(b"\0")  # same name, other bytes
    (stage / "im005.guided-backprop.jpg").unlink()

    assert _cli.main(argv(setup, out, "--resume")) == 0
    assert outputs(out) | {JOURNAL: b""} == reference | {JOURNAL: b""}
    done = [r["path"] for r in journal(out)]
    twice = sorted(Path(p).stem for p in done if done.count(p) > 1)
    assert twice == ["im003", "im003", "im005", "im005"] and len(done) == N + 2


def _tamper(journal_file: Path, stem: str) -> None:
    """Edit the record of image ``stem`` by hand: another class name and score, its files untouched."""
    lines = journal_file.read_text().splitlines(keepends=True)
    for k, line in enumerate(lines):
        rec = json.loads(line)
        if Path(rec["path"]).stem == stem:
            rec["entry"]["explanations"][0].update(class_name="TAMPERED", score=999)
            lines[k] = json.dumps(rec) + "\n"
    journal_file.write_text("".join(lines))


def test_an_edited_journal_entry_is_redone(setup, reference_run, reference, tmp_path, monkeypatch, capsys):
    """A hand-edited entry (its files as written) is not reused, in an interrupted run's stage nor in a
    finished run's journal.jsonl: the image is explained again, and the manifest is as if never edited."""
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        fail_after(m, 10)
        assert _cli.main(argv(setup, out, "--resume")) == 130
    (shard,) = (out / ".camframe" / "stage-resume" / "journal").glob("*.jsonl")
    _tamper(shard, "im004")
    capsys.readouterr()
    assert _cli.main(argv(setup, out, "--resume")) == 0
    assert "skipped 1 malformed or edited journal line(s)" in capsys.readouterr().err
    assert outputs(out) | {JOURNAL: b""} == reference | {JOURNAL: b""}
    done = [Path(r["path"]).stem for r in journal(out)]
    assert [s for s in done if done.count(s) > 1] == [] and len(done) == N  # the edited line is not kept

    finished = tmp_path / "finished"
    shutil.copytree(reference_run, finished)
    _tamper(finished / JOURNAL, "im007")
    assert _cli.main(argv(setup, finished, "--resume")) == 0
    assert outputs(finished) | {JOURNAL: b""} == reference | {JOURNAL: b""}
    lines = (finished / JOURNAL).read_text().splitlines()
    assert sorted(lines) == sorted((reference_run / JOURNAL).read_text().splitlines())  # the redone one last
    assert "TAMPERED" not in (finished / "manifest.json").read_text()


def test_rerun_of_a_finished_run_reuses_its_files(setup, reference_run, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)

    def nothing_to_do(ex, todo, *args, **kwargs):
        assert not todo, "an image was explained again"
        yield from ()

    monkeypatch.setattr(writer, "explain_stream", nothing_to_do)
    assert _cli.main(argv(setup, out, "--resume")) == 0
    assert outputs(out) == reference


def test_a_run_without_resume_leaves_a_resumable_stage_alone(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        fail_after(m, 4)
        assert _cli.main(argv(setup, out, "--resume")) == 130
    stage = out / ".camframe" / "stage-resume"
    kept = {p.name: p.read_bytes() for p in stage.rglob("*") if p.is_file()}
    assert _cli.main(argv(setup, out, "--no-guided")) == 0
    assert {p.name: p.read_bytes() for p in stage.rglob("*") if p.is_file()} == kept
    assert not (out / JOURNAL).exists()
