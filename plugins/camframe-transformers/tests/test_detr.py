"""Hugging Face DETR, RT-DETR and RT-DETRv2 query by query: the detections of the processor's own
post-processing, one map per kept query, gradients to every default layer, the model given back
unchanged, and the command line on ``hf:`` checkpoints.

Random-weight models (seeded), built offline from small configs (timm ResNet-18 without pretrained
weights for DETR, a one-block-per-stage ResNet for RT-DETR), on Ultralytics' bus.jpg at 224-320 px;
a threshold of 0 keeps every query (DETR) or the top (query, class) pairs (RT-DETR).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

import camframe
import camframe_transformers
from camframe import CamframeError
from camframe.cli import main
from camframe.adapters.state import explaining
from camframe.testing import check_adapter
from camframe_transformers.detr import _pixel_mask

NAMES = {0: "person", 1: "bus", 2: "car"}
SMALL = dict(d_model=32, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
             decoder_ffn_dim=64, decoder_layers=2, num_queries=6, id2label=NAMES)
FAMILIES = ["detr", "rtdetr", "rtdetr_v2"]


def _bus() -> Path:
    import ultralytics

    return Path(os.path.dirname(ultralytics.__file__)) / "assets" / "bus.jpg"


@lru_cache(maxsize=None)
def build(family: str) -> tuple[Any, Any]:
    """A seeded random-weight detector of ``family`` and its image processor (small sizes)."""
    torch.manual_seed(0)
    if family == "detr":
        config = transformers.DetrConfig(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False,
                                         encoder_layers=1, **SMALL)
        processor = transformers.DetrImageProcessor(size={"shortest_edge": 224, "longest_edge": 320})
        return transformers.DetrForObjectDetection(config), processor
    backbone = transformers.RTDetrResNetConfig(layer_type="basic", depths=[1, 1, 1, 1], embedding_size=16,
                                               hidden_sizes=[16, 32, 64, 128], out_features=["stage2", "stage3", "stage4"])
    kwargs = dict(backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32,
                  decoder_in_channels=[32, 32, 32], **SMALL)
    v2 = family == "rtdetr_v2"
    config = (transformers.RTDetrV2Config if v2 else transformers.RTDetrConfig)(**kwargs)
    model = (transformers.RTDetrV2ForObjectDetection if v2 else transformers.RTDetrForObjectDetection)(config)
    return model, transformers.RTDetrImageProcessor(size={"height": 256, "width": 256})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``hf:`` specs of the three models saved with their processors."""
    specs = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        model, processor = build(family)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        specs[family] = f"hf:{folder}"
    return specs


def _own(family: str, images: list[np.ndarray]) -> tuple[Any, list[dict[str, torch.Tensor]], Any]:
    """The processor's inputs, ``post_process_object_detection`` at threshold 0, the raw outputs."""
    model, processor = build(family)
    inputs = processor(images=[im.copy() for im in images], return_tensors="pt")  # copies: writable
    with explaining(model), torch.no_grad():
        outputs = model(**inputs)
    return inputs, processor.post_process_object_detection(outputs, threshold=0.0,
                                                           target_sizes=[im.shape[:2] for im in images]), outputs


def _explainer(family: str, **kwargs: Any) -> camframe.Explainer:
    model, processor = build(family)
    camframe_transformers.set_processor(model, processor)
    return camframe.Explainer(model, options={"conf": 0.0}, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_detections_are_the_post_processing_output(family: str) -> None:
    image = camframe.load_image(_bus())
    _, (own,), outputs = _own(family, [image])
    with _explainer(family) as ex:
        x, metas = ex.preprocess([image])
        dets = ex.adapter.detect(ex.model(x), metas, ex.model)[0]
    assert len(dets) == len(own["scores"]) == 6
    order = own["scores"].argsort(descending=True, stable=True)
    h, w = image.shape[:2]
    boxes = own["boxes"][order].clamp(min=0).minimum(torch.tensor([w, h, w, h]))  # camframe clips to the image
    np.testing.assert_allclose([d.score for d in dets], own["scores"][order], atol=1e-5)
    assert [d.class_id for d in dets] == own["labels"][order].tolist()
    assert [d.class_name for d in dets] == [NAMES[int(c)] for c in own["labels"][order]]
    np.testing.assert_allclose([d.box for d in dets], boxes, atol=0.05)
    # the index is the query that produced the detection
    logits = outputs.logits[0]
    probs = logits.softmax(-1)[:, :-1] if family == "detr" else logits.sigmoid()
    np.testing.assert_allclose([float(probs[d.index, d.class_id]) for d in dets], [d.score for d in dets], atol=1e-5)


def test_detr_batch_pads_with_the_processors_pixel_mask() -> None:
    """Two images of different shapes: the same padded batch, pixel mask and detections as the processor's."""
    bus = camframe.load_image(_bus())
    images = [bus, np.ascontiguousarray(bus[:500, :700])]
    inputs, own, _ = _own("detr", images)
    with _explainer("detr") as ex:
        x, metas = ex.preprocess(images)
        detections = ex.adapter.detect(ex.model(x), metas, ex.model)
    assert x.shape == inputs["pixel_values"].shape
    torch.testing.assert_close(x, inputs["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(_pixel_mask(x), inputs["pixel_mask"])
    for image, dets, theirs in zip(images, detections, own):
        order = theirs["scores"].argsort(descending=True, stable=True)
        h, w = image.shape[:2]
        np.testing.assert_allclose([d.score for d in dets], theirs["scores"][order], atol=1e-5)
        np.testing.assert_allclose([d.box for d in dets], theirs["boxes"][order].clamp(min=0).minimum(
            torch.tensor([w, h, w, h])), atol=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_explained_detections_are_the_post_processing_output_on_a_batch_of_shapes(family: str) -> None:
    """bus.jpg (810x1080), a 3:1 strip and a landscape crop of it, explained in one batch: the detections
    explained are the processor's post-processed ones (boxes within 1 px, scores within 0.005)."""
    bus = camframe.load_image(_bus())
    images = [bus, np.ascontiguousarray(bus[400:670]), np.ascontiguousarray(bus[:500, :700])]
    assert [im.shape[:2] for im in images] == [(1080, 810), (270, 810), (500, 700)]
    _, own, _ = _own(family, images)
    with _explainer(family, guided=False) as ex:
        result = ex(images, boxes="top:1")
    for image, dets, theirs in zip(images, result.detections, own):
        order = theirs["scores"].argsort(descending=True, stable=True)
        h, w = image.shape[:2]
        assert len(dets) == len(order) == 6
        np.testing.assert_allclose([d.score for d in dets], theirs["scores"][order], atol=0.005)
        assert [d.class_id for d in dets] == theirs["labels"][order].tolist()
        np.testing.assert_allclose([d.box for d in dets], theirs["boxes"][order].clamp(min=0).minimum(
            torch.tensor([w, h, w, h])), atol=1)
    assert [(t.image, t.box) for t in result.targets] == [(0, 0), (1, 0), (2, 0)]


@pytest.mark.parametrize("family", FAMILIES)
def test_contract_one_map_per_query_every_layer_reached(family: str, checkpoints: dict[str, str],
                                                          tmp_path: Path) -> None:
    """``check_adapter`` (maps at the photo's size, every default layer reached, the model given
    back unchanged; DETR and RT-DETR: ``camframe explain`` on the ``hf:`` checkpoint too), then one
    target per kept detection, scored by its query's logit, with maps of their own."""
    image = camframe.load_image(_bus())
    model, processor = build(family)
    if family == "rtdetr_v2":
        camframe_transformers.set_processor(model, processor)
        result = check_adapter(model, [image], options={"conf": 0.0})
    else:  # loaded from the checkpoint, with the processor saved beside it
        result = check_adapter(None, [_bus()], spec=checkpoints[family], out_dir=tmp_path, options={"conf": 0.0})
        manifest = (tmp_path / "manifest.json").read_text()
        assert all(name in manifest for name in {t.class_name for t in result.targets})
    dets = result.detections[0]
    assert len(dets) == 6 and [t.detection for t in result.targets] == dets
    assert len({tuple(m.flatten()[::97].tolist()) for m in result.maps}) > 1  # not one map for all queries
    logits = _own(family, [image])[2].logits[0]
    np.testing.assert_allclose([t.score for t in result.targets],
                               [float(logits[d.index, d.class_id]) for d in dets], atol=1e-4)
    expected = ["model.encoder.layers.0"] if family == "detr" else \
        ["model.encoder.fpn_blocks.1", "model.encoder.pan_blocks.0", "model.encoder.pan_blocks.1"]
    assert list(result.reached) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_preset_is_reached(family: str) -> None:
    """The ``backbone`` preset: the stages the encoder reads (DETR: the last; RT-DETR: three)."""
    ex = _explainer(family, layers="backbone")
    expected = ["model.backbone.model.layer4"] if family == "detr" else \
        [f"model.backbone.model.encoder.stages.{i}" for i in (1, 2, 3)]
    assert list(ex.layers) == expected
    reached = ex([camframe.load_image(_bus())], boxes="top:1").reached
    assert list(reached) == expected and all(bool(r.all()) for r in reached.values())


def test_a_module_returning_a_model_output_is_a_layer() -> None:
    """DETR's ``model.encoder`` returns a ``BaseModelOutput`` the model reads by attribute: recorded
    as its tokens on the grid, and handed on as its own type."""
    result = _explainer("detr", layers=["model.encoder"])([camframe.load_image(_bus())], boxes="top:1")
    assert result.layer_maps["model.encoder"].shape == (1, 10, 7)  # 298 x 224 input, stride 32
    assert bool(result.reached["model.encoder"].all())


def test_cli_plugins_layers_and_bad_input(checkpoints: dict[str, str], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    assert "camframe-transformers" in listing and "transformers-detr" in listing
    assert main(["layers", "--model", checkpoints["rtdetr"]]) == 0
    layers = capsys.readouterr().out
    assert "model.encoder.pan_blocks.1" in layers and "model.backbone.model.encoder.stages.3" in layers
    out = tmp_path / "out"
    assert main(["explain", str(_bus()), "--model", checkpoints["detr"], "-O", "size=8", "--out", str(out)]) == 2
    assert "size must be at least 32" in capsys.readouterr().err
    assert main(["explain", str(_bus()), "--model", f"hf:{tmp_path / 'none'}", "--out", str(out)]) == 2
    assert "cannot load hf:" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(CamframeError, match="carries its own weights"):
        camframe.load_model(checkpoints["detr"], "weights.pt")
