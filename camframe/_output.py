"""Write pictures, maps and the manifest atomically: an interrupted run leaves no truncated file."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ._errors import CamframeError

__all__ = ["OutputDir", "write_bytes", "slug"]


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputDir:
    """A directory written file by file, atomically; if the run fails, its files are removed again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: list[Path] = []
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".camframe-probe.", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise CamframeError(f"{path}: output directory is not writable ({exc.strerror or exc})") from None

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            for p in self.written:
                p.unlink(missing_ok=True)

    def _put(self, name: str, data: bytes) -> str:
        path = self.path / name
        write_bytes(path, data)
        self.written.append(path)
        return name

    def image(self, name: str, rgb: np.ndarray, quality: int = 90) -> str:
        """Write an RGB uint8 picture (format from the suffix); returns ``name``."""
        ok, buf = cv2.imencode(Path(name).suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise CamframeError(f"{name}: cannot encode image")
        return self._put(name, buf.tobytes())

    def array(self, name: str, array: np.ndarray) -> str:
        """Write a float32 ``.npy``."""
        buf = io.BytesIO()
        np.save(buf, array.astype(np.float32), allow_pickle=False)
        return self._put(name, buf.getvalue())

    def json(self, name: str, data: Any) -> str:
        return self._put(name, (json.dumps(data, indent=2) + "\n").encode())

    def text(self, name: str, text: str) -> str:
        return self._put(name, text.encode())


def slug(text: str) -> str:
    """A file-name-safe form of a class name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "class"
