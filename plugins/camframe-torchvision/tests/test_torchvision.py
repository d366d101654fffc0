"""Default layers, preprocessing and class names of the torchvision adapter, family by family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import camframe
from camframe import CamframeError

FAMILIES = {
    "resnet18": "layer4", "resnext50_32x4d": "layer4", "wide_resnet50_2": "layer4", "vgg11": "features.20",
    "densenet121": "features", "mobilenet_v2": "features.18", "mobilenet_v3_small": "features.12",
    "efficientnet_b0": "features.8", "efficientnet_v2_s": "features.7", "convnext_tiny": "features.7",
    "regnet_y_400mf": "trunk_output", "shufflenet_v2_x0_5": "conv5", "squeezenet1_0": "features",
    "googlenet": "inception5b", "inception_v3": "Mixed_7c",
}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_default_layer_explains(name):
    torch.manual_seed(0)
    model = camframe.load_model(name, "random")
    ex = camframe.Explainer(model, guided=False)
    assert ex.adapter.name == "torchvision"
    assert list(ex.layers) == [FAMILIES[name]]
    size = 299 if name == "inception_v3" else ex.adapter.size
    assert ex.adapter.size == size
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    result = ex([image])  # top-1 (random weights: another class may not reach squeezenet's final ReLU)
    assert result.targets[0].class_name in ex.adapter.categories and result.maps.shape == (1, size, size)
    assert result.original()[0].shape == (90, 120)
    assert bool(result.reached[FAMILIES[name]].all())


def test_categories_and_normalisation_come_from_the_weights_meta():
    ex = camframe.Explainer(camframe.load_model("resnet18", "random"))
    meta = torchvision.models.ResNet18_Weights.DEFAULT
    assert ex.adapter.categories == meta.meta["categories"]
    assert ex.adapter.mean == tuple(meta.transforms().mean)


def test_spec_errors_are_one_line():
    with pytest.raises(CamframeError, match="unknown torchvision classifier"):
        camframe.load_model("torchvision:not_a_model")
    with pytest.raises(CamframeError, match="need a download"):
        camframe.load_model("resnet152")


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(CamframeError, match="do not fit"):
        camframe.load_model("mobilenet_v2", str(path))


def test_loader_leaves_no_mark_on_the_model_and_the_adapter_still_knows_its_builder():
    model = camframe.load_model("efficientnet_b3", "random")
    assert not [k for k in vars(model) if "camframe" in k]
    assert camframe.Explainer(model).adapter.size == 300  # efficientnet_b3's weights meta, not a guess's 224
