"""Reading inputs: the pixel limit, files that are not regular files, camframe's own outputs, glob
loops, high-depth and odd image modes, and the memory the guided pictures take."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

import camframe
from camframe import CamframeError, load_image
from camframe import cli as _cli
from camframe.output import writer
from camframe.output.inputs import expand_inputs

RANDOM = ["--model", "mobilenet_v2", "--weights", "random"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camframe", *args], capture_output=True, text=True, timeout=300)


def assert_cli_refuses(proc: subprocess.CompletedProcess, out: Path, words: str) -> None:
    """Exit 2, one ``camframe: error:`` line that says ``words``, and nothing written."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("camframe: error: ") and words in lines[0], lines
    assert not out.exists() or not any(out.rglob("*"))


def finishes(fn: Callable[[], Any], seconds: float = 20) -> Any:
    """``fn()``'s result or exception, failing the test if it blocks."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def png_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A real, fully decodable all-black grey PNG of ``width`` x ``height``, a few hundred kB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    squeeze, row = zlib.compressobj(1), bytes(width + 1)
    idat = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


# --------------------------------------------------------------------------- the pixel limit
def test_bomb_refused_from_its_header(bomb, monkeypatch):
    """A 20000 x 20000 PNG: a one-line CamframeError naming the limit, and nothing is decoded."""
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self))
    with pytest.raises(CamframeError, match=r"20000x20000 is 400,000,000 pixels, more than the limit of "
                                            r"100,000,000 \(raise it with --max-pixels"):
        load_image(bomb)
    assert decoded == []
    assert camframe.MAX_PIXELS == 100_000_000


def test_pixel_limit_can_be_lowered_and_raised(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(path)
    with pytest.raises(CamframeError, match="300x200 is 60,000 pixels, more than the limit of 59,999"):
        load_image(path, max_pixels=59_999)
    assert load_image(path, max_pixels=60_000).shape == (200, 300, 3)
    with camframe.pixel_limit(1000):
        with pytest.raises(CamframeError, match="limit of 1,000"):
            load_image(path)
    assert load_image(path).shape == (200, 300, 3)
    # a limit above PIL's own (here 100 pixels) is camframe's to give: PIL neither refuses nor warns
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path)[0, 0].tolist() == [10, 20, 30]
    assert Image.MAX_IMAGE_PIXELS == 100
    for bad in (0, -5, 2.5, True, "many"):
        with pytest.raises(CamframeError, match="must be a whole number of at least 1"):
            load_image(path, max_pixels=bad)


def test_cli_bomb_is_one_line_error(bomb, tmp_path):
    out = tmp_path / "out"
    assert_cli_refuses(run_cli("explain", str(bomb), *RANDOM, "--out", str(out)), out, "more than the limit")


@pytest.mark.needs_plugins  # torchvision's MobileNetV2
def test_cli_max_pixels_option(tmp_path, capsys):
    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 48)).save(path)
    out = tmp_path / "out"
    argv = ["explain", str(path), *RANDOM, "--quiet", "--no-guided", "--out", str(out)]
    assert _cli.main([*argv, "--max-pixels", "3000"]) == 2
    assert "64x48 is 3,072 pixels, more than the limit of 3,000" in capsys.readouterr().err
    assert not out.exists()
    assert _cli.main([*argv, "--max-pixels", "0"]) == 2
    assert "must be a whole number of at least 1, got 0" in capsys.readouterr().err
    assert _cli.main([*argv, "--max-pixels", "3072"]) == 0
    assert (out / "photo.cam.jpg").is_file()


# --------------------------------------------------------------------------- not regular files
def test_fifo_is_not_a_regular_file_and_never_blocks(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for read in (lambda: load_image(fifo), lambda: expand_inputs([str(fifo)])):
        with pytest.raises(CamframeError, match=r"pipe.png: not a regular file \(a FIFO\)$"):
            finishes(read)


def test_cli_fifo_is_one_line_error(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    assert_cli_refuses(run_cli("explain", str(fifo), *RANDOM, "--out", str(out)), out, "not a regular file")


def test_symbolic_link_loop_and_broken_link(tmp_path):
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    (tmp_path / "gone.png").symlink_to("nowhere.png")
    for read in (load_image, lambda p: expand_inputs([str(p)])):
        with pytest.raises(CamframeError, match=r"a.png: symbolic link loop$"):
            read(tmp_path / "a.png")
        with pytest.raises(CamframeError, match=r"gone.png: broken symbolic link$"):
            read(tmp_path / "gone.png")
    with pytest.raises(CamframeError, match=r"missing.png: no such file$"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(CamframeError, match=r": not a regular file \(a directory\)$"):
        load_image(tmp_path)


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"")
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "readme.txt").write_text("no pictures here")
    with pytest.raises(CamframeError, match=r"notes: no image files in this folder$"):
        expand_inputs([str(tmp_path / "photo.png"), str(empty)])


@pytest.mark.needs_plugins
def test_not_an_image_after_ultralytics_replaced_pillow_open(tmp_path):
    """Importing Ultralytics first swaps Pillow's Image.open for one that tries to install pi-heif
    when Pillow cannot identify a file; load_image still just says "not an image"."""
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a picture")
    code = ("import ultralytics, camframe\n"
            "try:\n    camframe.load_image(r'%s')\nexcept camframe.CamframeError as exc:\n    print(exc)" % notes)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{notes}: not an image", proc.stdout + proc.stderr
    assert "pi-heif" not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- camframe's own outputs
def photo(path: Path, colour: tuple[int, int, int] = (90, 120, 150)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_outputs_listed_in_run_json_are_not_inputs(tmp_path):
    for name in ("cat.png", "cat.cam.jpg", "cat.guided-backprop.jpg", ".camframe/stage-1/dog.png"):
        photo(tmp_path / name)
    (tmp_path / ".camframe" / "run.json").write_text(json.dumps(
        {"files": ["cat.cam.jpg", "cat.guided-backprop.jpg", "manifest.json"]}))
    photo(tmp_path / "sub" / "x.png")
    assert expand_inputs([str(tmp_path)]) == [tmp_path / "cat.png"]
    assert expand_inputs([f"{tmp_path}/**/*"]) == [tmp_path / "cat.png", tmp_path / "sub" / "x.png"]
    with pytest.raises(CamframeError, match="pattern matches no file"):
        expand_inputs([f"{tmp_path}/.camframe/**/*.png"])
    with pytest.raises(CamframeError, match="pattern matches only camframe's own outputs"):
        expand_inputs([f"{tmp_path}/*.jpg"])
    (tmp_path / "cat.png").unlink()
    with pytest.raises(CamframeError, match="no image files in this folder besides camframe's own outputs"):
        expand_inputs([str(tmp_path)])


@pytest.mark.legacy_manifest
def test_legacy_manifest_outputs_are_not_inputs(tmp_path):
    for name in ("bus.jpg", "bus.detections.jpg", "bus.box0.person.cam.jpg", "bus.box0.person.guided-gradcam.jpg"):
        photo(tmp_path / name)
    manifest = {"camframe": "0.1.0", "images": [{"path": "bus.jpg", "overview": "bus.detections.jpg",
                                                  "explanations": [{"files": {
                                                      "cam": "bus.box0.person.cam.jpg",
                                                      "guided-gradcam": "bus.box0.person.guided-gradcam.jpg"}}]}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert expand_inputs([str(tmp_path)]) == [tmp_path / "bus.jpg"]


@pytest.mark.needs_plugins  # torchvision's MobileNetV2
def test_out_equal_to_input_folder_explains_only_the_inputs(tmp_path):
    for name in ("a.png", "b.png"):
        photo(tmp_path / name)
    argv = ["explain", str(tmp_path), *RANDOM, "--quiet", "--out", str(tmp_path)]
    for _ in range(2):
        assert _cli.main(argv) == 0
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        assert [Path(e["path"]).name for e in manifest["images"]] == ["a.png", "b.png"]
    assert not list(tmp_path.glob("*.cam.cam.jpg"))


# --------------------------------------------------------------------------- globs
def test_recursive_glob_through_a_symbolic_link_loop_lists_each_file_once(tmp_path):
    photo(tmp_path / "a.png")
    photo(tmp_path / "sub" / "b.png")
    (tmp_path / "sub" / "back").symlink_to("..")
    found = finishes(lambda: expand_inputs([f"{tmp_path}/**/*.png"]))
    assert found == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]


# --------------------------------------------------------------------------- modes and depths
def test_float_image_in_unit_range_is_scaled_and_deep_integers_keep_working(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (8, 1))
    expected = np.round(ramp * 255).astype(np.uint8)
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit.tif")
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "deep16.png")
    Image.fromarray((ramp * 65535).round().astype(np.int32)).save(tmp_path / "deep32.tif")
    Image.fromarray((ramp * 255).round(), mode="F").save(tmp_path / "float255.tif")
    for name in ("unit.tif", "deep16.png", "deep32.tif", "float255.tif"):
        got = load_image(tmp_path / name)
        assert got.shape == (8, 256, 3) and got.dtype == np.uint8
        assert np.abs(got[..., 0].astype(int) - expected).max() <= 1, name
        assert (got == got[..., :1]).all()


def test_odd_modes_decode_without_warnings(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[:15, :, 2] = np.arange(40) * 6, np.arange(30)[:, None] * 8, 200
    base = Image.fromarray(rgb)
    palette = base.convert("P", palette=Image.ADAPTIVE, colors=16)
    made = {"cmyk.tif": base.convert("CMYK"), "la.png": base.convert("LA"), "bits.png": base.convert("1"),
            "deep.png": Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)}
    for name, im in made.items():
        im.save(tmp_path / name)
    palette.save(tmp_path / "alpha-palette.png", transparency=bytes([0, 128] + [255] * 14))
    made["alpha-palette.png"] = palette.convert("RGBA")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, im in made.items():
            got = load_image(tmp_path / name)
            want = np.asarray(im.convert("RGB")) if im.mode != "I;16" else np.asarray(base.convert("L"))[..., None]
            assert got.shape == (30, 40, 3) and got.dtype == np.uint8, name
            assert np.abs(got.astype(int) - want).max() <= 1, name


# --------------------------------------------------------------------------- memory
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def test_guided_pictures_of_a_large_image_stay_near_one_float32_image(tmp_path, images, mobilenet_weights,
                                                                     monkeypatch):
    """Writing one 4000 x 3000 image's overlay and guided pictures peaks below three float32 RGB
    copies of it (computed in float64 at full size, one target took about nine)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        if os.environ.get("CAMFRAME_REQUIRE_CLEAR_REFS"):
            pytest.fail("CAMFRAME_REQUIRE_CLEAR_REFS is set but /proc/self/clear_refs is not writable")
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory "
                    "(set CAMFRAME_REQUIRE_CLEAR_REFS=1 to make this a failure)")
    big = tmp_path / "big.jpg"
    Image.open(images["chelsea"]).convert("RGB").resize((4000, 3000)).save(big, quality=85)
    real, peaks = writer._write_image, []

    def measured(*args: Any, **kwargs: Any) -> Any:
        before = _status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to what the process holds now
        entry = real(*args, **kwargs)
        peaks.append(_status_mb("VmHWM") - before)
        return entry

    monkeypatch.setattr(writer, "_write_image", measured)
    out = tmp_path / "out"
    argv = ["explain", str(big), "--model", "mobilenet_v2", "--weights", mobilenet_weights, "--guided"]
    assert _cli.main([*argv, "--quiet", "--out", str(out)]) == 0
    one_float32_image_mb = 4000 * 3000 * 3 * 4 / 2**20
    assert len(peaks) == 1 and peaks[0] < 3 * one_float32_image_mb, (peaks, one_float32_image_mb)
    for kind in ("guided-backprop", "guided-gradcam"):
        with Image.open(out / f"big.{kind}.jpg") as im:
            assert im.size == (4000, 3000)
            grey = np.asarray(im.convert("L"), dtype=np.float32)
        assert 100 < grey.mean() < 155 and grey.std() > 2, (kind, grey.mean(), grey.std())
