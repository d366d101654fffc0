"""Writing explanations to an output folder, as ``camframe explain`` does: pictures, maps, manifest, report."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from camframe.adapters.detector import Boxes, select_boxes
from camframe.core import validate as _validate
from camframe.core.errors import CamframeError
from camframe.core.images import check_image
from camframe.engine.explainer import Explainer, Result
from camframe.output.folder import OutputDir, class_label
from camframe.output.inputs import expand_inputs
from camframe.output.journal import Resume, run_key
from camframe.output.manifest import caption, detection_record, explanation_record, head, size
from camframe.output.outcomes import Request, annotate, contrast_part, file_part, pictured, record_fields, truth_boxes
from camframe.output.overview import Overviews
from camframe.output.pipeline import explain_stream
from camframe.output.render import draw_boxes, draw_detections, gradient_image, overlay
from camframe.output.report import render

__all__ = ["write"]


def _nothing_to_explain(entries: list[dict[str, Any]], boxes: Boxes | None) -> str:
    """Why a run found no target in any image (run as it was, it would write nothing of use)."""
    found = sum(len(e.get("detections", [])) for e in entries)
    if boxes is None:
        why = "no target"
    elif not found:
        why = "no detections (a lower conf may find some)"
    else:
        why = f"--boxes {boxes} picks none of the {found} detection(s)"
    return f"nothing to explain: {why} in {len(entries)} image(s)"


def _inputs(items: Sequence[str], workers: int | None) -> list[Path]:
    """The input files, each checked from its header before anything is written (the pipeline decodes)."""
    if workers is not None and workers < 0:
        raise CamframeError("--workers must be 0 or more")
    paths = expand_inputs(items)
    for path in paths:
        check_image(path)
    return paths


def _stems(paths: Sequence[Path]) -> dict[Path, str]:
    """Each input's output name stem: its own, or x-2, x-3... (x-2.y for x.y) where another input's
    stem is the same or one is the other's dotted prefix (``a`` and ``a.circle`` would both write
    ``a.circle.cam.jpg``: a class's map of ``a``, the overview map of ``a.circle``)."""
    used: set[str] = set()
    prefixes: set[str] = set()  # every dotted prefix of a used stem: a, a.b for a.b.c
    stems = {}
    for path in paths:
        stem, n = path.stem, 1
        head, dot, tail = stem.partition(".")
        while stem in used or stem in prefixes or not used.isdisjoint(_dotted_prefixes(stem)):
            n += 1
            stem = f"{head}-{n}{dot}{tail}"
        used.add(stem)
        prefixes.update(_dotted_prefixes(stem))
        stems[path] = stem
    return stems


def _dotted_prefixes(stem: str) -> list[str]:
    parts = stem.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _explain_into(out: OutputDir, ex: Explainer, paths: Sequence[Path], classes: list[int] | None,
                  boxes: Boxes | None, batch_size: int | None, save_maps: bool, quiet: bool,
                  workers: int | None = None, resume: Resume | None = None,
                  request: Request | None = None) -> dict[str, Any]:
    stems = _stems(paths)
    several = bool(classes) and len(classes) > 1
    done = {p: e for p in paths if resume is not None and (e := resume.reuse(p, stems[p])) is not None}

    def write(result: Result, i: int, path: Path, image: np.ndarray) -> dict[str, Any]:
        return _write_image(out, save_maps, ex, result, i, path, image, stems[path], several)

    entries = dict(done)
    todo = [p for p in paths if p not in done]
    stream = explain_stream(ex, todo, write, target=classes, boxes=boxes, batch_size=batch_size, workers=workers,
                            request=request)
    with contextlib.closing(stream), tqdm(total=len(paths), initial=len(done), unit="image",
                                          disable=quiet or None, file=sys.stderr) as bar:
        for entry, path in zip(stream, todo):  # in input order, each once its files are written
            entries[path] = entry
            if resume is not None:
                resume.add(path, stems[path], entry)
            bar.update(1)
    if resume is not None:
        resume.finish()  # the journal is committed with the run, as journal.jsonl
    return {**_manifest_head(ex), "images": [entries[p] for p in paths]}


def _manifest_head(ex: Explainer, device: str | None = None) -> dict[str, Any]:
    """What a manifest says of the run before its images (also ``camframe.ray``'s, whose actors' ``device``
    it names): the explainer's settings, device and versions (``_manifest.head``)."""
    return head(ex.adapter, device or ex.device, {
        "adapter": ex.adapter.name, "method": ex.method_name, "layers": list(ex.layers), "aggregate": ex.aggregate,
        "normalise": ex.normalise, **({"method_options": ex.method_options} if ex.method_options else {}),
        **({"smooth": str(ex.smooth)} if ex.smooth else {})})


def _write_image(out: OutputDir, save_maps: bool, ex: Explainer, result: Result, index: int, path: Path,
                 image: np.ndarray, stem: str, several_classes: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": str(path), "size": size(image), "explanations": []}
    rows = [u for u, t in enumerate(result.targets) if t.image == index]
    detections = result.detections[index] if result.detections is not None else None
    info = result.outcomes[index] if result.outcomes is not None else {}
    if detections is not None:
        entry["detections"] = [detection_record(d) for d in detections]
        labels = [f"{k}: {d.class_name} {d.score:.2f}" for k, d in enumerate(detections)]
        truth, truth_labels = truth_boxes(info)  # with --labels, the ground truth drawn too
        entry["overview"] = out.image(f"{stem}.detections.jpg", draw_detections(
            image, truth + detections, truth_labels + labels, ex.adapter.skeleton))
        if not detections:
            tqdm.write(f"{path}: no detections above the confidence threshold", file=sys.stderr)
    annotate(entry, info)
    if not rows:
        return entry
    overviews = Overviews(several_classes)
    for u in rows:  # one target at a time: full-size buffers for one picture, however many targets
        t = result.targets[u]
        names = ex.adapter.class_names(ex.model)
        record = {**explanation_record(ex.adapter, t), **record_fields(t, info, names)}
        name = stem + file_part(t)
        if t.box is None and t.subject is None and several_classes:
            name += f".{class_label(t.class_id, t.class_name)}"
        name += contrast_part(t, names)
        heat = result.original(result.maps[u][None], [u])[0].clamp(0, 1).cpu().numpy()
        if t.subject is None and t.contrast is None:
            overviews.add(t, heat)
        picture = overlay(image, heat)
        if t.detection is not None:
            drawn, labels = pictured(t, info)
            picture = draw_boxes(picture, drawn + [t.detection],
                                 labels + [caption(t, record["target_score_kind"], record["supported"])])
        files = {"cam": out.image(f"{name}.cam.jpg", picture)}
        if result.guided is not None:  # the gradients mapped onto the original once; Grad-CAM's map there
            guided = result.original(result.guided[u][None], [u])[0]
            files["guided-gradcam"] = out.image(f"{name}.guided-gradcam.jpg",
                                                gradient_image(guided, lambda g: g * torch.from_numpy(heat)))
            # a resize makes a new tensor, ours to work on; an image of the input's size gets the row itself
            ours = guided.untyped_storage().data_ptr() != result.guided.untyped_storage().data_ptr()
            files["guided-backprop"] = out.image(f"{name}.guided-backprop.jpg", gradient_image(guided, inplace=ours))
            del guided
        if save_maps:
            files["map"] = out.array(f"{name}.cam.npy", heat)
        if t.subject is not None and t.subject[0] in ("missed", "user_box"):
            entry["missed" if t.subject[0] == "missed" else "user_boxes"][t.subject[1]]["files"] = files
        entry["explanations"].append({
            **record, "method": result.method, "layers": list(ex.layers), "aggregate": result.aggregate,
            "normalise": result.normalise, "files": files,
            **({"smooth": result.smooth} if result.smooth else {}),
            **({"views": result.views[u]} if result.views is not None else {})})
    entry.update(overviews.write(out, stem, image, save_maps))  # detectors: <stem>.cam.jpg, per class with --classes
    return entry


def write(explainer: Explainer, images: Sequence[str | Path], out: str | Path, *, model: str | None = None,
          classes: Sequence[str | int] | None = None, boxes: Any = None, save_maps: bool = False,
          report: bool = False, overwrite: bool = False, resume: bool = False, batch_size: int | None = None,
          workers: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Explain ``images`` into the folder ``out``, writing exactly what ``camframe explain`` writes.

    Args:
        explainer: the ``Explainer`` to run (its model, adapter, method, layers...).
        images: image files, folders (their images) and glob patterns, as the command takes them.
        out: the output folder; written as one transaction (nothing half-written is left).
        model: what the manifest names as the model (default: the model's class name).
        classes: class names or ids to explain (``--classes``); default: the adapter's choice.
        boxes: which detections to explain (``--boxes``: ``"all"``, a number or a list of indices).
        save_maps: also write each map as ``.cam.npy`` (``--save-maps``).
        report: also write ``index.html`` (``--report``).
        overwrite: replace a folder that holds something else (``--overwrite``).
        resume: reuse the images a stopped run already wrote (``--resume``).
        batch_size: images per forward pass (``--batch-size``).
        workers: image-decoding threads (``--workers``).
        quiet: no progress bar.

    Returns:
        The manifest, as written to ``out/manifest.json``.
    """
    paths = _inputs([str(i) for i in images], workers)
    ids = None if classes is None else _validate.class_ids([str(c) for c in classes], explainer.adapter,
                                                            explainer.model)
    return _write(explainer, paths, Path(out), model or type(explainer.model).__name__, ids,
                  select_boxes(explainer.adapter, boxes), save_maps, report, overwrite, resume, batch_size, workers,
                  quiet)


def _write(ex: Explainer, paths: Sequence[Path], out_path: Path, model: str, classes: list[int] | None,
           boxes: Boxes | None, save_maps: bool, report: bool, overwrite: bool, resume: bool,
           batch_size: int | None, workers: int | None, quiet: bool,
           elsewhere: Callable[[OutputDir], dict[str, Any]] | None = None,
           request: Request | None = None) -> dict[str, Any]:
    """``write`` for checked inputs; ``elsewhere``: computes the manifest into the open folder (Ray);
    ``request``: ground truth, user boxes and a contrast class (``--labels``, ``--box``, ``--contrast``)."""
    if batch_size is not None and batch_size < 1:
        raise CamframeError("--batch-size must be at least 1")
    with OutputDir(out_path, overwrite, resumable=resume or elsewhere is not None) as out:
        if elsewhere is not None:
            manifest = elsewhere(out)
        else:
            key = (boxes, request.key) if request else boxes
            journal = Resume(out, run_key(ex, model, classes, key, save_maps)) if resume else None
            manifest = _explain_into(out, ex, paths, classes, boxes, batch_size, save_maps, quiet, workers, journal,
                                     request)
        if not any(e["explanations"] for e in manifest["images"]):
            raise CamframeError(_nothing_to_explain(manifest["images"], boxes))
        manifest["model"] = model
        out.json("manifest.json", manifest)
        if report:
            out.text("index.html", render(manifest, title=f"camframe: {model}"))
    return manifest
