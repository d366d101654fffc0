"""The input files of a run: files, folders (their images) and glob patterns, camframe's own outputs left out."""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path
from typing import Iterable

from camframe.core.errors import CamframeError
from camframe.core.images import IMAGE_SUFFIXES, _regular_file
from camframe.output.folder import recorded_files

__all__ = ["expand_inputs"]


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
