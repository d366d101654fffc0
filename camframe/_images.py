"""Read images from disk into RGB uint8 arrays, whatever their mode or bit depth."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ._errors import CamframeError

__all__ = ["IMAGE_SUFFIXES", "load_image", "expand_inputs"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` fully to an ``(H, W, 3)`` RGB uint8 array (16-bit scaled, alpha dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CamframeError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb8(im)
    except UnidentifiedImageError:
        raise CamframeError(f"{path}: not an image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CamframeError(f"{path}: cannot decode image ({exc})") from None


def _to_rgb8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.width == 0 or im.height == 0:
        raise ValueError("empty image")
    return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files, directories (their images, sorted) and glob patterns, in the order given."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            found.append(p)
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise CamframeError(f"{item}: pattern matches no file")
            found += [m for m in matches if m.is_file()]
        else:
            raise CamframeError(f"{item}: no such file")
    if not found:
        raise CamframeError("no input images")
    return list(dict.fromkeys(found))
