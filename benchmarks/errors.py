"""The COCO YOLO11n's errors on the real-photo set, explained (docs/explaining-errors.md).

    python benchmarks/errors.py [--out DIR] [--pictures N]

Runs ``camframe explain PHOTOS --labels benchmarks/data/real_coco.json --report`` with
``$CAMFRAME_CACHE/yolo11n.pt`` (scripts/yolo11n_coco.py) on the photos that scripts/real_photos.py gathers,
prints each missed object and false alarm (Markdown tables, for the docs page) with its map's pointing hit on
the object, and writes the first N of each as small JPEGs under docs/img/ (errors-missed-*.jpg,
errors-fp-*.jpg, errors-confusion-*.jpg: a false positive's class minus its object's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

from _evidence import real_photo_paths  # noqa: E402
from real_photos import cache_dir  # noqa: E402

from camframe.cli import main as camframe  # noqa: E402

LABELS = ROOT / "benchmarks" / "data" / "real_coco.json"
IMG = ROOT / "docs" / "img"


def _inside(heat: np.ndarray, box: list[float]) -> bool:
    """The pointing game: the map's peak inside the box."""
    y, x = np.unravel_index(int(heat.argmax()), heat.shape)
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _picture(src: Path, name: str, width: int = 480) -> str:
    image = cv2.imread(str(src))
    h, w = image.shape[:2]
    small = cv2.resize(image, (width, round(h * width / w)), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(IMG / name), small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return f"img/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("errors-run"), help="camframe's output folder")
    parser.add_argument("--pictures", type=int, default=3, help="pictures of each kind for docs/img/")
    args = parser.parse_args()
    cache = cache_dir()
    photos = real_photo_paths(cache)
    code = camframe(["explain", *map(str, photos), "--model", str(cache / "yolo11n.pt"), "--labels", str(LABELS),
                     "--save-maps", "--report", "--quiet", "--workers", "0", "--overwrite", "--out", str(args.out)])
    if code:
        raise SystemExit(code)
    manifest = json.loads((args.out / "manifest.json").read_text())
    missed, alarms = [], []
    for entry in manifest["images"]:
        name = Path(entry["path"]).name
        for m in entry.get("missed", []):
            if "files" not in m:
                continue
            hit = _inside(np.load(args.out / m["files"]["map"]), m["gt_box"])
            missed.append((name, m, hit))
        for e in entry["explanations"]:
            if e.get("outcome") == "fp" and "contrast_class_id" not in e:
                det = entry["detections"][e["box_index"]]
                alarms.append((name, det, e, entry["ground_truth"]))
    tp = sum(d.get("outcome") == "tp" for e in manifest["images"] for d in e.get("detections", []))
    print(f"{len(manifest['images'])} photos: {tp} detections correct, {len(alarms)} false alarms, "
          f"{len(missed)} objects missed; the missed objects' maps peak inside the object for "
          f"{sum(h for *_, h in missed)} of {len(missed)}\n")
    print("| photo | missed object | candidate score | candidate IoU | why | map peak inside |")
    print("|---|---|---|---|---|---|")
    for name, m, hit in missed:
        c, why = m["candidate"], m.get("why", {})
        reason = "below conf" if why.get("below_threshold") else ""
        if "top_class" in why:
            reason += f"{', ' if reason else ''}{why['top_class']['class_name']} scores higher there"
        if "suppressed_by" in why:
            reason += f"{', ' if reason else ''}suppressed by box {why['suppressed_by']['box_index']}"
        inside = "yes" if hit else "no"
        print(f"| {name} | {m['class_name']} | {c['score']:.3f} | {c['iou']:.2f} | {reason} | {inside} |")
    print("\n| photo | false alarm | score | over a ground-truth object of another class |")
    print("|---|---|---|---|")
    for name, det, e, truth in alarms:
        other = det.get("confused_with")
        over = f"{other['class_name']} (IoU {other['iou']:.2f})" if other else "–"
        print(f"| {name} | {det['class_name']} | {det['detection_score']:.2f} | {over} |")
    IMG.mkdir(exist_ok=True)
    for k, (name, m, _) in enumerate(missed[:args.pictures]):
        print(_picture(args.out / m["files"]["cam"], f"errors-missed-{k}.jpg"), name, m["class_name"])
    for k, (name, det, e, _) in enumerate(alarms[:args.pictures]):
        print(_picture(args.out / e["files"]["cam"], f"errors-fp-{k}.jpg"), name, det["class_name"])
    confusions = [(Path(entry["path"]).name, e) for entry in manifest["images"] for e in entry["explanations"]
                  if e.get("outcome") == "fp" and "contrast_class_id" in e]
    for k, (name, e) in enumerate(confusions[:args.pictures]):
        print(_picture(args.out / e["files"]["cam"], f"errors-confusion-{k}.jpg"), name,
              f"{e['class_name']} minus {e['contrast_class_name']}")


if __name__ == "__main__":
    main()
