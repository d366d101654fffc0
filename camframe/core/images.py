"""Read images from disk into RGB uint8 arrays, whatever their mode or bit depth; collect input files."""

from __future__ import annotations

import errno
import fnmatch
import glob
import io
import os
import stat
import sys
import threading
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from camframe.core.errors import CamframeError
from camframe.output.folder import recorded_files

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "load_image", "decode_image", "check_image", "pixel_limit", "expand_inputs"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}

MAX_PIXELS = 100_000_000
"""The largest image (width x height) ``load_image`` decodes unless told otherwise: 100 megapixels."""

_max_pixels: ContextVar[int] = ContextVar("camframe_max_pixels", default=MAX_PIXELS)
_PIL_LIMIT = threading.Lock()  # guards PIL's global Image.MAX_IMAGE_PIXELS while camframe decodes
_REASONS = {errno.ENOENT: "no such file", errno.ENOTDIR: "no such file", errno.ELOOP: "symbolic link loop"}
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")  # one channel of 16-bit, 32-bit int or float samples


def _pillow_open() -> Callable[..., Image.Image]:
    """Pillow's own ``Image.open``. Importing Ultralytics replaces it by a wrapper that, on a file
    Pillow cannot identify, tries to pip-install and import pi-heif; the wrapper's module keeps the
    original as ``_image_open``."""
    fn = Image.open
    if fn.__module__ != Image.__name__:
        fn = getattr(sys.modules.get(fn.__module__), "_image_open", fn)
    return fn


_PIL_OPEN = _pillow_open()


def _checked_limit(max_pixels: Any) -> int:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise CamframeError(f"the pixel limit (--max-pixels, max_pixels) must be a whole number of at least 1, "
                            f"got {max_pixels!r}")
    return int(max_pixels)


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Inside the block, ``load_image`` (and so the ``Explainer`` given paths) accepts images of up to
    ``max_pixels`` pixels instead of ``MAX_PIXELS``."""
    token = _max_pixels.set(_checked_limit(max_pixels))
    try:
        yield
    finally:
        _max_pixels.reset(token)


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Decode ``path`` fully to an ``(H, W, 3)`` RGB uint8 array (16-bit and float scaled, alpha dropped).

    An image of more than ``max_pixels`` pixels (default: ``MAX_PIXELS``, or the ``pixel_limit`` in
    force) is refused from its header, before anything is decoded. Only regular files are opened, and
    opening never blocks (a FIFO is refused).
    """
    image = _read(Path(path), max_pixels, decode=True)
    assert image is not None
    return image


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """``load_image`` for an image's bytes in memory (a Ray dataset's); ``name`` names it in errors."""
    image = _read(Path(name), max_pixels, decode=True, data=data)
    assert image is not None
    return image


def check_image(path: str | os.PathLike, max_pixels: int | None = None) -> None:
    """What ``load_image`` checks before it decodes, from the header alone: a regular file holding an
    image of at most ``max_pixels`` pixels. Nothing is decoded (a file cut short passes)."""
    _read(Path(path), max_pixels, decode=False)


def _read(path: Path, max_pixels: int | None, decode: bool, data: bytes | None = None) -> np.ndarray | None:
    limit = _max_pixels.get() if max_pixels is None else _checked_limit(max_pixels)
    source = io.BytesIO(data) if data is not None else os.fdopen(_open_regular(path), "rb")
    try:
        with source as f, _decode(f, path, limit, decode) as im:
            return _to_rgb8(ImageOps.exif_transpose(im)) if decode else None
    except UnidentifiedImageError:
        raise CamframeError(f"{path}: not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CamframeError(f"{path}: cannot decode image ({exc})") from None


def _reason(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOENT and path.is_symlink():
        return "broken symbolic link"
    return _REASONS.get(exc.errno or 0, (exc.strerror or str(exc)).lower())


def _not_regular(path: Path, mode: int) -> CamframeError:
    kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
    return CamframeError(f"{path}: not a regular file ({kind})")


def _open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (O_NONBLOCK: a FIFO never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CamframeError(f"{path}: {_reason(path, exc)}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    return fd


def _regular_file(path: Path) -> Path:
    """``path`` if it names a regular file (checked with stat: nothing is opened)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CamframeError(f"{path}: {_reason(path, exc)}") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    return path


def _decode(f: IO[bytes], path: Path, limit: int, load: bool = True) -> Image.Image:
    """The image in ``f``, loaded (if ``load``) once its header's size is known to be at most ``limit`` pixels.
    While decoding, PIL's own bomb check (TIFF tiles, GIF frames) uses the same limit, as an error."""
    with _PIL_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None  # the header is checked below, with the image's own numbers
            im = _PIL_OPEN(f)
            w, h = im.size
            if w * h > limit:
                raise CamframeError(f"{path}: {w}x{h} is {w * h:,} pixels, more than the limit of {limit:,} "
                                    "(raise it with --max-pixels N, or load_image(..., max_pixels=N))")
            Image.MAX_IMAGE_PIXELS = limit
            if load:
                im.load()
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    return im


def _to_rgb8(im: Image.Image) -> np.ndarray:
    if im.width == 0 or im.height == 0:
        raise ValueError("empty image")
    if im.mode not in _HIGH_DEPTH:
        if "transparency" in im.info:  # a palette's per-entry alpha: via RGBA, or PIL warns
            im = im.convert("RGBA")
        return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    a = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
    high = float(a.max())
    if im.mode.startswith("I;16") or high > 255:
        top = 65535.0
    else:
        top = 1.0 if im.mode == "F" and high <= 1 else 255.0  # a float image in [0, 1]
    a *= 255.0 / top
    a += 0.5
    gray = np.clip(a, 0, 255, out=a).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns (``**``: any depth), in the order given,
    each file once. Folders and patterns leave out camframe's own outputs (the files a folder's
    ``.camframe/run.json`` lists) and everything under a ``.camframe/`` folder."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += _folder_images(p)
        elif glob.has_magic(item) and not os.path.lexists(item):
            found += _pattern_files(item)
        else:
            found.append(_regular_file(p))
    if not found:
        raise CamframeError("no input images")
    return list(dict.fromkeys(found))


def _folder_images(folder: Path) -> list[Path]:
    candidates = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())
    outputs = _outputs(folder)
    kept = [f for f in candidates if f.name not in outputs]
    if not kept:
        besides = " besides camframe's own outputs" if candidates else ""
        raise CamframeError(f"{folder}: no image files in this folder{besides}")
    return kept


def _pattern_files(pattern: str) -> list[Path]:
    matches = sorted(set(p for p in _glob(pattern) if p.is_file() and ".camframe" not in p.parts))
    if not matches:
        raise CamframeError(f"{pattern}: pattern matches no file")
    cache: dict[Path, set[str]] = {}
    kept = [m for m in matches if not any(m.relative_to(d).as_posix() in cache.setdefault(d, _outputs(d))
                                          for d in m.parents)]
    if not kept:
        raise CamframeError(f"{pattern}: pattern matches only camframe's own outputs")
    return kept


def _outputs(folder: Path) -> set[str]:
    """Names (relative to ``folder``) of the files camframe's last run wrote there."""
    return set(recorded_files(folder))


def _glob(pattern: str) -> list[Path]:
    """The paths ``pattern`` matches, as ``glob.glob(pattern, recursive=True)`` would, except that
    ``**`` visits each real folder once: a symbolic link loop neither repeats files nor recurses."""
    path, folders_only = Path(pattern), pattern.endswith(("/", os.sep))
    parts = list(path.parts[1:] if path.is_absolute() else path.parts)
    if parts[-1] == "**" and not folders_only:
        parts.append("*")  # a trailing ** also matches the files in every folder
    paths = [Path(path.anchor) if path.is_absolute() else Path()]
    for part in parts:
        if part == "**":
            paths = [d for p in paths for d in _tree(p)]
        elif glob.has_magic(part):
            paths = [p / name for p in paths for name in _names(p)
                     if fnmatch.fnmatch(name, part) and (part.startswith(".") or not name.startswith("."))]
        else:
            paths = [p / part for p in paths]
    return [p for p in paths if p.is_dir()] if folders_only else paths


def _names(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def _tree(folder: Path) -> list[Path]:
    """``folder`` and the folders below it (hidden ones aside, symbolic links followed), each real
    folder once, breadth first."""
    seen: set[tuple[int, int]] = set()
    found, queue = [], [folder]
    for d in queue:
        try:
            st = d.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            found.append(d)
            queue += _subfolders(d)
    return found


def _subfolders(folder: Path) -> list[Path]:
    """The folders in ``folder`` (hidden ones aside): real ones first, then symbolic links, by name."""
    try:
        with os.scandir(folder) as entries:
            found = sorted((e.is_symlink(), e.name) for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []
    return [folder / name for _, name in found]
