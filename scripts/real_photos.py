"""Copy the photos of the real-photo benchmark (``benchmarks/data/real_coco.json``) into a folder.

Every photo ships inside a package: scikit-image, matplotlib and Ultralytics (installed in the
venv) and the source distributions of ``sahi==0.12.8``, ``labelme==7.9.1`` and
``face_recognition==1.3.0`` (each downloaded once with ``pip download --no-deps --no-binary :all:
--ignore-requires-python`` into the cache, checked against its SHA-256, and read without being
extracted or installed). Each image entry's ``source`` names the package and the photo's path:
inside site-packages for an installed package, inside the sdist for a pinned one.

    python scripts/real_photos.py OUT_DIR [--cache DIR]   # cache: $CAMFRAME_CACHE or ~/.cache/camframe

Idempotent: a photo already in OUT_DIR with the same bytes is left alone. Each photo's size is
checked against the JSON's ``width`` and ``height`` (another package version could ship another
photo). Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT / "benchmarks" / "data" / "real_coco.json"
SDISTS = {"sahi==0.12.8": ("sahi-0.12.8.tar.gz", "f2074b3b3aa0f655dbdd69fbb1f1a0b985220f5fb3d920a4206eba160d37028a"),
          "labelme==7.9.1": ("labelme-7.9.1.tar.gz",
                             "d8cc51cde4dc8160284ed7f65ea417c9887ac7b0c4bf49ee1d7de974d0068a62"),
          "face_recognition==1.3.0": ("face_recognition-1.3.0.tar.gz",
                                      "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec")}


class DataError(Exception):
    """A photo cannot be found, fetched or checked (the message is one line)."""


def cache_dir() -> Path:
    """Where downloaded sdists live: ``$CAMFRAME_CACHE`` or ``~/.cache/camframe``."""
    return Path(os.environ.get("CAMFRAME_CACHE") or Path.home() / ".cache" / "camframe")


def sdist(requirement: str, cache: Path) -> Path:
    """The pinned source distribution ``requirement``, downloaded into ``cache`` unless already there."""
    if requirement not in SDISTS:
        raise DataError(f"no pinned source distribution for {requirement!r}")
    name, sha256 = SDISTS[requirement]
    path = cache / name
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--ignore-requires-python", requirement, "-d", str(cache)]  # only read, never installed
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not path.is_file():
            raise DataError(f"pip download {requirement} failed: {pip_error(done.stderr)}")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise DataError(f"{path}: SHA-256 differs from the pinned {requirement}")
    return path


def pip_error(stderr: str) -> str:
    """The most telling line of pip's error output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()] or ["no output"]
    return next((line for line in reversed(lines) if line.lower().startswith("error")), lines[-1])


def installed(path: str) -> Path:
    """``path`` (``package/inside/it``) inside the installed package, found without importing it."""
    top, _, rest = path.partition("/")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {top!r} is not installed (needed for {path})")
    return Path(list(spec.submodule_search_locations)[0]) / rest


def read_source(source: dict, cache: Path) -> bytes:
    """The bytes of the photo that ``source`` (``{"package", "path"}``) names."""
    if "==" not in source["package"]:
        file = installed(source["path"])
        if not file.is_file():
            raise DataError(f"{file}: not found in the installed {source['package']}")
        return file.read_bytes()
    with tarfile.open(sdist(source["package"], cache)) as tar:
        try:
            member = tar.extractfile(source["path"])
        except KeyError:
            member = None
        if member is None:
            raise DataError(f"{source['path']}: not in {source['package']}")
        return member.read()


def write_if_changed(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` (atomically), unless the file already holds exactly these bytes."""
    if dest.is_file() and dest.read_bytes() == data:
        return
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def checked_photo(image: dict, cache: Path) -> bytes:
    """The bytes of the photo of COCO image entry ``image``, checked to have the recorded size."""
    data = read_source(image["source"], cache)
    size = Image.open(io.BytesIO(data)).size
    if size != (image["width"], image["height"]):
        raise DataError(f"{image['file_name']}: {size[0]}x{size[1]} px, the JSON says "
                        f"{image['width']}x{image['height']} (another package version?)")
    return data


def copy_photos(out_dir: Path, cache: Path, coco: Path = COCO) -> list[Path]:
    """Copy every image ``coco`` names into ``out_dir`` (nothing is written unless all are found and
    checked); return their paths."""
    photos = {image["file_name"]: checked_photo(image, cache) for image in json.loads(coco.read_text())["images"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in photos.items():
        write_if_changed(out_dir / name, data)
    return [out_dir / name for name in photos]


def main(argv: list[str] | None = None) -> int:
    """Command line: copy the photos into OUT_DIR and print how many."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--cache", type=Path, default=None, help="sdist cache (default: $CAMFRAME_CACHE or "
                        "~/.cache/camframe)")
    args = parser.parse_args(argv)
    try:
        paths = copy_photos(args.out_dir, args.cache or cache_dir())
    except (DataError, OSError, tarfile.TarError) as err:
        print(f"real_photos.py: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(paths)} photos in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
