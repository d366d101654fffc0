"""A test kit for adapter authors: ``check_adapter`` asserts what camframe expects of an adapter.

    from camframe.testing import check_adapter

    def test_my_adapter(tmp_path):
        check_adapter(load_my_model(), ["face.jpg"], spec="my-model", out_dir=tmp_path)

It checks that the default layers (and layer presets) are submodules of the prepared model; that
explaining ``images`` gives at least one target, maps ``(U, H, W)`` in [0, 1] that map back
onto each original image, and a finite score per target; that every default layer gets a
non-zero gradient from at least one target (a layer recorded per call, ``name#i``, counts as
reached when any of its calls is); that the model comes back exactly as it was (same modules,
training flags, ``requires_grad``, values, no hooks left, no ``.grad``); and, given ``spec`` and
``out_dir``, that ``camframe explain`` runs and writes every file its manifest names, with maps
at each original image's size. A failure raises ``AssertionError`` saying what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from camframe.plugins import manager as _plugins
from camframe.adapters.base import Adapter
from camframe.core.errors import CamframeError
from camframe.engine.explainer import Explainer, Result
from camframe.core.images import load_image

__all__ = ["check_adapter"]

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = tuple(f"_global{h}" for h in _HOOKS)


def check_adapter(model: Any, images: Any, *, adapter: str | Adapter | None = None, spec: str | None = None,
                  weights: str | None = None, out_dir: str | os.PathLike[str] | None = None,
                  options: dict[str, Any] | None = None) -> Result:
    """Explain ``images`` (paths or RGB uint8 arrays) with ``model`` and assert the adapter contract.

    ``model`` None loads ``spec`` (with ``weights``) through the plugins. ``adapter`` and
    ``options`` go to the ``Explainer``. With ``spec`` and ``out_dir`` the model is loaded again from
    ``spec`` and explained into ``out_dir`` as ``camframe explain --save-maps`` writes (``camframe.write``).

    Args:
        model: the model, or None to load ``spec``.
        images: one image or a list: paths or RGB uint8 arrays.
        adapter: an adapter name or instance (default: the one the plugins pick).
        spec: what ``--model`` would take (a plugin's model name or file).
        weights: a weights file for ``spec``.
        out_dir: where to write the output folder (with ``spec``).
        options: the adapter's options (``-O key=value``).

    Returns:
        The ``Result`` of explaining the images with the default layers.

    Raises:
        AssertionError: the adapter breaks the contract (the message says where).
    """
    if model is None:
        if spec is None:
            raise ValueError("check_adapter needs a model or a spec")
        model = _plugins.load_model(spec, weights)
    items = [images] if isinstance(images, (str, os.PathLike, np.ndarray)) else list(images)
    arrays = [im if isinstance(im, np.ndarray) else load_image(im) for im in items]
    label = f"adapter {getattr(adapter, 'name', adapter)!r}" if adapter is not None else "the adapter"
    before = _snapshot(model)
    try:
        ex = Explainer(model, adapter=adapter, options=options)
    except CamframeError as exc:
        raise AssertionError(f"{label}: cannot build an Explainer with the default layers: {exc}") from exc
    label = f"adapter {ex.adapter.name!r}"
    defaults = _check_layers(label, ex)
    prepared = _snapshot(ex.model) if ex.model is not model else None
    try:
        result = ex(arrays)
    except CamframeError as exc:
        raise AssertionError(f"{label}: explaining failed: {exc}") from exc
    _check_result(label, result, arrays, defaults)
    _check_restored(label, "the model", before, model)
    if prepared is not None:
        _check_restored(label, "the prepared model", prepared, ex.model)
    if spec is not None and out_dir is not None:
        name = None if adapter is None else ex.adapter.name
        _check_cli(label, spec, weights, name, options or {}, items, Path(out_dir))
    return result


def _check_layers(label: str, ex: Explainer) -> list[str]:
    named = dict(ex.model.named_modules())
    defaults = ex.adapter.layers(ex.model)
    assert defaults, f"{label}: layers() names no default layer"
    presets = ex.adapter.layer_presets(ex.model)
    named_sets = [("default layer", defaults), *((f"layer preset {k!r} names", v) for k, v in presets.items())]
    for source, layers in named_sets:
        for layer in layers:
            assert isinstance(layer, str) and layer and layer in named, \
                f"{label}: {source} {layer!r} is not a submodule of the prepared {type(ex.model).__name__}"
    for layer in defaults:
        assert ex.layers[layer] is named[layer], f"{label}: default layer {layer!r} resolves to another module"
    return list(defaults)


def _check_result(label: str, result: Result, arrays: list[np.ndarray], defaults: list[str]) -> None:
    u = len(result.targets)
    assert u >= 1, f"{label}: no target to explain in {len(arrays)} image(s)" + (
        f" ({sum(map(len, result.detections))} detection(s))" if result.detections is not None else "")
    maps = result.maps
    assert maps.ndim == 3 and maps.shape[0] == u, \
        f"{label}: maps have shape {tuple(maps.shape)}, expected ({u}, H, W)"
    assert bool(torch.isfinite(maps).all()), f"{label}: maps hold NaN or inf"
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1, \
        f"{label}: maps span [{float(maps.min()):.3g}, {float(maps.max()):.3g}], not [0, 1]"
    for k, t in enumerate(result.targets):
        assert isinstance(t.score, float) and math.isfinite(t.score), \
            f"{label}: target {k} ({t.class_name}) has score {t.score!r}; score() must give one per target"
        assert 0 <= t.image < len(arrays), f"{label}: target {k} points at image {t.image} of {len(arrays)}"
        if t.box is not None and result.detections is not None:
            dets = result.detections[t.image]
            assert 0 <= t.box < len(dets) and t.detection is dets[t.box], \
                f"{label}: target {k} names box {t.box}, which is not detection {t.box} of image {t.image}"
    for k, (m, t) in enumerate(zip(result.original(), result.targets)):
        size = arrays[t.image].shape[:2]
        assert tuple(m.shape) == size, \
            f"{label}: to_original() gives target {k} a map of {tuple(m.shape)}, not the image's {size}"
    for layer in defaults:
        calls = [k for k in result.reached if k == layer or k.rpartition("#")[0] == layer]
        assert any(bool(result.reached[k].any()) for k in calls), \
            f"{label}: default layer {layer!r} gets no gradient from any of the {u} target(s); " \
            "the scores do not depend on it, so it adds nothing to any map"


def _snapshot(model: Any) -> dict[str, Any] | None:
    if not isinstance(model, nn.Module):
        return None
    hooks = {n: sum(len(getattr(m, h)) for h in _HOOKS) for n, m in model.named_modules()}
    hooks["<global>"] = sum(len(getattr(nn.modules.module, h, {})) for h in _GLOBAL_HOOKS)
    params = dict(model.named_parameters())
    return {
        "modules": {n: id(m) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
        "values": {n: t.detach().clone() for n, t in [*params.items(), *model.named_buffers()]},
        "grads": {n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()},
        "hooks": hooks,
    }


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))


def _check_restored(label: str, what: str, before: dict[str, Any] | None, model: Any) -> None:
    after = _snapshot(model)
    if before is None or after is None:
        return
    problems = []
    for key, say in [("modules", "module objects differ at"), ("training", "training flags differ at"),
                     ("requires_grad", "requires_grad differs at"), ("hooks", "forward/backward hooks differ at"),
                     ("values", "values changed in"), ("grads", ".grad set on")]:
        same = _same if key in ("values", "grads") else (lambda a, b: a == b)
        changed = sorted(n for n in before[key].keys() | after[key].keys()
                         if n not in before[key] or n not in after[key] or not same(before[key][n], after[key][n]))
        if changed:
            problems.append(f"{say} {', '.join(map(repr, changed[:5]))}" + (" ..." if len(changed) > 5 else ""))
    assert not problems, f"{label} did not give back {what} as it came: " + "; ".join(problems)


def _check_cli(label: str, spec: str, weights: str | None, adapter: str | None, options: dict[str, Any],
               items: list[Any], out: Path) -> None:
    from camframe.output.writer import write

    with tempfile.TemporaryDirectory(prefix="camframe-check-") as tmp:
        paths = []
        for k, im in enumerate(items):
            if isinstance(im, np.ndarray):  # the command reads files: write arrays out first
                path = Path(tmp, f"image{k}.png")
                cv2.imwrite(str(path), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
                im = path
            paths.append(str(im))
        try:
            ex = Explainer(_plugins.load_model(spec, weights), adapter=adapter, options=options)
            write(ex, paths, out, model=spec, save_maps=True)
        except CamframeError as exc:
            raise AssertionError(f"{label}: writing {spec} into {out} failed: {exc}") from exc
        manifest = json.loads((out / "manifest.json").read_text())
        entries = manifest["images"]
        assert len(entries) == len(paths), f"{label}: the manifest lists {len(entries)} image(s), not {len(paths)}"
        for entry in entries:
            size = load_image(entry["path"]).shape[:2]
            assert (entry["size"]["height"], entry["size"]["width"]) == size, \
                f"{label}: the manifest gives {entry['path']} size {entry['size']}, not {size}"
            named = [entry["overview"]] if "overview" in entry else []
            for e in entry["explanations"]:
                named += e["files"].values()
                assert "map" in e["files"], f"{label}: --save-maps wrote no map for {entry['path']}"
                heat = np.load(out / e["files"]["map"])
                assert heat.shape == size and np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1, \
                    f"{label}: {e['files']['map']} has shape {heat.shape}, range [{heat.min()}, {heat.max()}]; " \
                    f"expected {size} in [0, 1]"
            missing = [f for f in named if not (out / f).is_file()]
            assert not missing, f"{label}: the manifest names files that were not written: {', '.join(missing)}"
