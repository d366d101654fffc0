"""Read images from disk into RGB uint8 arrays, whatever their mode or bit depth
(``camframe.output.inputs`` collects input files)."""

from __future__ import annotations

import errno
import io
import os
import stat
import sys
import threading
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from camframe.core.errors import CamframeError

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "load_image", "decode_image", "check_image", "pixel_limit"]

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

    Args:
        path: the image file.
        max_pixels: the largest image accepted, width x height.

    Returns:
        The image, ``(H, W, 3)`` RGB ``uint8``.
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

