"""Time to explain every box of one image, against baselines measured in the same run.

    python benchmarks/yolo_speed.py [--model yolov8n.yaml] [--imgsz 640] [--repeats 5] [--device cpu]
                                    [--threads N] [--cpu-time] [--only core] [--out docs/benchmarks.md]

(a) one plain forward+backward of the model to its input; the floor: one forward and K head-only
``autograd.grad`` calls of the targets' logits to the explained layers (what any per-target
gradient method must do), one per target or as one batched VJP (``is_grads_batched``); camframe with
K = 1, 5, 20 boxes, one backward per box (``grad_batch=1``) or all boxes in one batched VJP
(``grad_batch=K``), and with the graph replicated (the image K times in one batch, one backward for
all boxes, through the engine's own map and aggregation code); (b) pytorch-grad-cam's HiResCAM with
one forward+backward per box (the usual per-box recipe); (c) Ultralytics' own
``predict(visualize=True)`` LayerCAM (top-16 predictions, one backward each). Then where camframe's
time goes at K = 20. Medians of ``--repeats`` runs after a warm-up; the fast contenders are timed
interleaved (one run of each in turn), so a changing machine load hits them alike.

``--device cuda`` runs everything on the GPU (synchronised around every timing) and writes the section
``yolo-speed-cuda`` instead of ``yolo-speed``. Without the camframe entry points installed
(``PYTHONPATH=.:plugins/camframe-ultralytics``), the Ultralytics plugin is registered here.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import ultralytics
from ultralytics import YOLO

import camframe
from camframe.core import aggregate as _aggregate
from camframe.engine import explainer as _explainer
from camframe.plugins import manager as _plugins

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baselines import Logits, write_section  # noqa: E402

BUS = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
KS = (1, 5, 20)


def register_plugin() -> None:
    """Register the Ultralytics adapter when its entry point is not installed."""
    if not any(a.name == "ultralytics" for a in _plugins.adapters()):
        import camframe_ultralytics

        _plugins.pm.register(camframe_ultralytics, name="ultralytics")


class Clock:
    """Median wall times, synchronising the GPU around each run; or the process's CPU time."""

    def __init__(self, device: torch.device, cpu_time: bool = False) -> None:
        self.sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.now = time.process_time if cpu_time else time.perf_counter

    def once(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = self.now()
        fn()
        self.sync()
        return self.now() - start

    def medians(self, fns: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
        """Each of ``fns`` run once as a warm-up, then ``repeats`` rounds of one run each in turn."""
        for fn in fns.values():
            fn()
        times: dict[Any, list[float]] = {key: [] for key in fns}
        for _ in range(repeats):
            for key, fn in fns.items():
                times[key].append(self.once(fn))
        return {key: statistics.median(t) for key, t in times.items()}


def floor(cx: camframe.Explainer, x: torch.Tensor, targets: list, batched: bool) -> None:
    """One forward recording the explained layers, then the K targets' gradients on them: one
    ``autograd.grad`` per target, or one batched VJP; nothing else."""
    with torch.enable_grad(), cx._capture.recording():
        outputs = cx.model(x.clone())
    acts = list(cx._capture.activations.values())
    if batched:
        scores = cx.adapter.score(outputs, targets)
        eye = torch.eye(len(targets), device=scores.device)
        torch.autograd.grad(scores, acts, eye, is_grads_batched=True, allow_unused=True)
    else:
        for i, t in enumerate(targets):
            torch.autograd.grad(cx.adapter.score(outputs, [t]).sum(), acts, retain_graph=i < len(targets) - 1,
                                allow_unused=True)
    cx._capture.reset()


def replicated(cx: camframe.Explainer, image: Any, k: int) -> torch.Tensor:
    """camframe's maps of the top ``k`` boxes with the graph replicated: detect on one plain forward,
    then the image ``k`` times in one batch, box i explained on copy i, all in one backward."""
    x, metas = cx.preprocess([image])
    x = x.to(cx.device)
    with torch.no_grad():
        detections = cx.adapter.detect(cx.model(x.clone()), metas, cx.model)
    targets = cx.adapter.targets(None, detections, None, camframe.Boxes(top=k), cx.model)
    with torch.enable_grad(), cx._capture.recording():
        outputs = cx.model(x.expand(len(targets), -1, -1, -1).clone())
    targets = [replace(t, image=i) for i, t in enumerate(targets)]
    try:
        maps, reached = cx._layer_maps(cx._capture.activations, cx.adapter.score, outputs, targets)
        return _aggregate.aggregate(maps, reached, tuple(x.shape[-2:]), cx.aggregate, cx.normalise)
    finally:
        cx._capture.reset()


def breakdown(cx: camframe.Explainer, image: Any, clock: Clock, repeats: int) -> dict[str, float]:
    """Seconds per call spent in each step of ``cx([image])``, by timing wrappers put around them."""
    spent: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            clock.sync()
            start = clock.now()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.sync()
                spent.setdefault(name, []).append(clock.now() - start)
        return run

    grad, combine, forward = torch.autograd.grad, _explainer.combine, cx.model.forward
    patches = [(torch.autograd, "grad", timed("gradients (autograd.grad)", grad)),
               (_explainer, "combine", timed("aggregation (to input size, combine, normalise)", combine)),
               (cx.model, "forward", timed("forward", forward)),
               (cx.adapter, "detect", timed("NMS (adapter.detect)", cx.adapter.detect)),
               (cx.adapter, "score", timed("scores (head branch recomputed)", cx.adapter.score)),
               (cx, "preprocess", timed("preprocess (letterbox)", cx.preprocess)),
               (cx, "_layer_maps", timed("_layer_maps", cx._layer_maps))]
    for owner, name, wrapper in patches:
        setattr(owner, name, wrapper)
    try:
        cx([image])
        spent.clear()
        total = [clock.once(lambda: cx([image])) for _ in range(repeats)]
    finally:
        for owner, name, _ in patches:
            if owner is cx or owner is cx.adapter or owner is cx.model:
                delattr(owner, name)  # the instance attribute hid the class's method
            else:
                setattr(owner, name, {"grad": grad, "combine": combine}[name])
    out = {name: sum(t) / repeats for name, t in spent.items()}
    inner = out.pop("_layer_maps")
    out["layer maps (method, reached, bookkeeping)"] = inner - out["gradients (autograd.grad)"] - \
        out.get("scores (head branch recomputed)", 0.0)
    out["total"] = sum(total) / repeats
    out["rest (targets, Result, detach)"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time by the process's CPU time, not the wall "
                        "clock: with --threads 1, the wall time of an idle machine, on a busy shared one")
    parser.add_argument("--only", choices=["core"], help="only (a), the per-box floor, camframe with "
                        "grad_batch=1 and where its time goes (quick; also runs on older camframe versions)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    register_plugin()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.cpu_time and device.type != "cpu":
        parser.error("--cpu-time times CPU runs only")
    clock = Clock(device, args.cpu_time)
    torch.manual_seed(0)
    yolo = YOLO(args.model, verbose=False)
    yolo.model.to(device)
    image = camframe.load_image(BUS)
    options = {"conf": 0.0, "imgsz": args.imgsz}
    explainers = {(k, gb): camframe.Explainer(yolo, options={**options, "max_det": k}, grad_batch=gb, group=False)
                  for k in KS for gb in sorted({1, k})}
    cx = explainers[20, 1]
    x, _ = cx.preprocess([image])
    x = x.to(device)
    model = cx.model.eval()  # camframe's private copy: the same weights for every contender
    for p in model.parameters():
        p.requires_grad_(False)

    def forward_backward() -> None:
        xi = x.clone().requires_grad_()
        torch.autograd.grad(model(xi)[0].sum(), xi)

    rows: dict[tuple[str, int], float] = {}
    for ex in explainers.values():
        ex.__enter__()
    try:
        targets = cx([image]).targets
        fns: dict[tuple[str, int], Callable[[], Any]] = {("(a) one forward + backward", 1): forward_backward}
        for k in KS:
            fns["floor: forward + one head-only autograd.grad per box", k] = \
                lambda k=k: floor(cx, x, targets[:k], batched=False)
            if k > 1 and not args.only:
                fns["floor: forward + one batched VJP (is_grads_batched)", k] = \
                    lambda k=k: floor(cx, x, targets[:k], batched=True)
            fns["camframe, one backward per box (grad_batch=1)", k] = lambda k=k: explainers[k, 1]([image])
            if k > 1 and not args.only:
                fns[f"camframe, one batched VJP (grad_batch={k})", k] = lambda k=k: explainers[k, k]([image])
                fns["camframe, graph replicated (K copies, one backward)", k] = lambda k=k: replicated(cx, image, k)
        rows.update(clock.medians(fns, args.repeats))
        same = None if args.only else \
            max((replicated(cx, image, k) - explainers[k, 1]([image]).maps).abs().max().item() for k in KS[1:])
        stages = breakdown(cx, image, clock, args.repeats)
    finally:
        for ex in explainers.values():
            ex.__exit__(None, None, None)
    if args.only:
        floor20 = rows["floor: forward + one head-only autograd.grad per box", 20]
        print("\n".join(f"{name} | K={k} | {t:.4f} s" for (name, k), t in rows.items()))
        print(f"camframe / floor at K = 20: {rows['camframe, one backward per box (grad_batch=1)', 20] / floor20:.2f}")
        print(_breakdown_table(stages))
        return
    rows.update(_baselines(yolo, model, x, targets, args, clock))
    text = _report(rows, stages, same, args, device, f"`{cx.method_name}`, aggregate `{cx.aggregate}` over "
                   f"{len(cx.layers)} layers, normalise `{cx.normalise}`", tuple(x.shape[-2:]))
    print(text)
    if args.out:
        name, title = ("yolo-speed", "") if device.type == "cpu" else (f"yolo-speed-{device.type}", " on the GPU")
        write_section(args.out, name, f"### Explaining every box of an image{title}\n\n{text}")


def _baselines(yolo: Any, model: torch.nn.Module, x: torch.Tensor, targets: list, args: argparse.Namespace,
               clock: Clock) -> dict[tuple[str, int], float]:
    """(b) pytorch-grad-cam's per-box loop and (c) Ultralytics' visualize, fewer repeats (slow)."""
    from pytorch_grad_cam import HiResCAM

    trainable = copy.deepcopy(model).requires_grad_(True)  # pytorch-grad-cam needs weights that require grad
    layers = [trainable.model[i] for i in trainable.model[-1].f]
    wrapper = Logits(trainable)
    fns: dict[tuple[str, int], Callable[[], Any]] = {}
    for k in KS:
        def loop(k: int = k) -> None:
            for t in targets[:k]:
                with HiResCAM(model=wrapper, target_layers=layers) as cam:
                    cam(input_tensor=x, targets=[lambda out, a=t.detection.index, c=t.class_id: out[c, a]])
        fns["(b) pytorch-grad-cam HiResCAM, one pass per box", k] = loop
    slow = max(1, args.repeats // 2)
    rows = clock.medians(fns, slow)
    device = "cpu" if x.device.type == "cpu" else 0
    with tempfile.TemporaryDirectory() as tmp:
        def predict(visualize: bool) -> None:
            yolo.predict(str(BUS), imgsz=args.imgsz, conf=0.0, visualize=visualize, verbose=False, project=tmp,
                         name="vis", exist_ok=True, device=device)
        rows.update(clock.medians({("(c) Ultralytics predict(visualize=True), top-16 predictions", 16):
                                   lambda: predict(True)}, slow))
        rows.update(clock.medians({("    Ultralytics predict() without visualize", 0): lambda: predict(False)},
                                  args.repeats))
    return rows


def _breakdown_table(stages: dict[str, float]) -> str:
    total = stages["total"]
    lines = ["| step of `Explainer(...)([image])`, K = 20 | seconds | share |", "|---|---|---|"]
    for name, t in sorted(stages.items(), key=lambda kv: -kv[1]):
        if name != "total":
            lines.append(f"| {name} | {t:.4f} | {100 * t / total:.0f} % |")
    return "\n".join(lines + [f"| **total** | {total:.4f} | 100 % |"])


def _report(rows: dict[tuple[str, int], float], stages: dict[str, float], same: float | None,
            args: argparse.Namespace, device: torch.device, engine: str, size: tuple[int, int]) -> str:
    base = rows["(a) one forward + backward", 1]
    if device.type == "cuda":
        where = f"GPU: {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        where += ", seconds of the process's CPU time" if args.cpu_time else ""
    lines = [f"Model `{args.model}` (random weights from the yaml), `bus.jpg` letterboxed to predict()'s "
             f"{size[1]}×{size[0]} at `imgsz={args.imgsz}`, {where}, torch {torch.__version__}, ultralytics {ultralytics.__version__}. "
             f"camframe's defaults: {engine}. Medians of {args.repeats} runs after a warm-up, all in one run.", "",
             "| contender | boxes K | seconds | × (a) | seconds per box |", "|---|---|---|---|---|"]
    group = {"(a": 0, "(b": 2, "(c": 3, "  ": 3}
    for (name, k), t in sorted(rows.items(), key=lambda kv: (group.get(kv[0][0][:2], 1), kv[0][1])):
        per_box = f"{t / k:.4f}" if k else "–"
        lines.append(f"| {name} | {k or '–'} | {t:.4f} | {t / base:.2f} | {per_box} |")
    cam = {k: min(t for (n, kk), t in rows.items() if kk == k and n.startswith("camframe")) for k in KS}
    best = {k: min((n for (n, kk) in rows if kk == k and n.startswith("camframe")),
                   key=lambda n: rows[n, k]) for k in KS}
    floor20 = min(t for (n, k), t in rows.items() if k == 20 and n.startswith("floor"))
    loop20 = rows["(b) pytorch-grad-cam HiResCAM, one pass per box", 20]
    vis = rows["(c) Ultralytics predict(visualize=True), top-16 predictions", 16]
    lines += ["", f"- K = 1: camframe {cam[1]:.4f} s = **{cam[1] / base:.2f}×** one forward+backward "
              "(target ≤ 0.8×).",
              f"- K = 20: the fastest {best[20]} {cam[20]:.4f} s vs the per-box loop {loop20:.4f} s: "
              f"**{loop20 / cam[20]:.1f}× faster** (target ≥ 8×); vs the faster floor {floor20:.4f} s: "
              f"**{cam[20] / floor20:.2f}×** (target ≤ 1.1×).",
              f"- Per explained box at K = 20: camframe {cam[20] / 20:.4f} s vs Ultralytics visualize "
              f"{vis / 16:.4f} s: **{vis / 16 / (cam[20] / 20):.1f}× faster**.",
              f"- The replicated graph gives the same maps as one backward per box: largest difference {same:.1e}.",
              "", "Where camframe's time goes (`grad_batch=1`, K = 20, means over the runs):", "",
              _breakdown_table(stages)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
