"""Vision transformers (torchvision ViT and Swin, timm ViT, DeiT and Swin): token outputs become
``(B, C, h, w)`` maps, the default layer is pytorch-grad-cam's recommended one, and the maps equal
pytorch-grad-cam's with its ``reshape_transform`` on that layer, on two real photos.

Random weights (seeded), so the test needs no download; the maps are still real gradients.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import timm
import torch
import torchvision
from pytorch_grad_cam import GradCAM, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

import camframe
from camframe import CamframeError, ClassifierAdapter, Explainer
from camframe import cli as _cli
from camframe.methods.weightings import eigencam
from camframe.testing import check_adapter

METHODS = {"elementwise": HiResCAM, "gradcam": GradCAM, "layercam": LayerCAM}
TOL = 1e-4


def _tokens(prefix: int, side: int) -> Callable[[Tensor], Tensor]:
    """pytorch-grad-cam's ViT ``reshape_transform``: drop ``prefix`` tokens, lay the rest on the grid."""
    def transform(tensor: Tensor) -> Tensor:
        result = tensor[:, prefix:, :].reshape(tensor.size(0), side, side, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return transform


def _channels_last(tensor: Tensor) -> Tensor:
    """pytorch-grad-cam's Swin ``reshape_transform`` for (B, H, W, C) outputs."""
    return tensor.permute(0, 3, 1, 2)


# spec -> (adapter, pytorch-grad-cam's recommended layer, its reshape_transform)
MODELS: dict[str, tuple[str, Callable[[Any], nn.Module], Callable[[Tensor], Tensor]]] = {
    "vit_b_32": ("torchvision-transformer", lambda m: m.encoder.layers[-1].ln_1, _tokens(1, 7)),
    "swin_t": ("torchvision-transformer", lambda m: m.features[-1][-1].norm1, _channels_last),
    "timm:vit_tiny_patch16_224": ("timm", lambda m: m.blocks[-1].norm1, _tokens(1, 14)),
    "timm:deit_tiny_patch16_224": ("timm", lambda m: m.blocks[-1].norm1, _tokens(1, 14)),
    "timm:deit_tiny_distilled_patch16_224": ("timm", lambda m: m.blocks[-1].norm1, _tokens(2, 14)),
    "timm:swin_tiny_patch4_window7_224": ("timm", lambda m: m.layers[-1].blocks[-1].norm1, _channels_last),
}


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    import skimage

    data = Path(os.path.dirname(skimage.__file__)) / "data"
    paths = [data / "chelsea.png", data / "coffee.png"]
    assert all(p.is_file() for p in paths)
    return paths


def _model(spec: str) -> nn.Module:
    torch.manual_seed(0)
    return camframe.load_model(spec, "random").eval()


def _reference(model: nn.Module, spec: str, x: Tensor, class_ids: list[int]) -> dict[str, np.ndarray]:
    """pytorch-grad-cam's maps of each method in METHODS on the recommended layer (one
    forward/backward, shared as in tests/engine/test_agreement.py)."""
    ref_model = copy.deepcopy(model)
    _, layer_of, transform = MODELS[spec]
    layer = layer_of(ref_model)
    ref_model.requires_grad_(False)
    layer.requires_grad_(True)
    targets = [ClassifierOutputTarget(c) for c in class_ids]
    base = GradCAM(ref_model, [layer], reshape_transform=transform)
    out = {"gradcam": base(x.clone(), targets)}
    for name, cls in METHODS.items():
        if name == "gradcam":
            continue
        cam = cls(ref_model, [layer], reshape_transform=transform)
        own, cam.activations_and_grads = cam.activations_and_grads, base.activations_and_grads
        own.release()
        out[name] = cam.aggregate_multi_layers(cam.compute_cam_per_layer(x, targets, False))
        cam.activations_and_grads = own
    base.activations_and_grads.release()
    return out


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request, photos):
    spec = request.param
    model = _model(spec)
    ex = Explainer(model, guided=False)
    x, _ = ex.preprocess(photos)
    with torch.no_grad():
        class_ids = model(x).argmax(1).tolist()
    return spec, model, ex, x, class_ids, _reference(model, spec, x, class_ids)


def test_default_layer_is_pytorch_grad_cams_recommended_one(setup):
    spec, model, ex, *_ = setup
    adapter, layer_of, _ = MODELS[spec]
    assert ex.adapter.name == adapter
    assert list(ex.layers.values()) == [layer_of(model)]


@pytest.mark.parametrize("method", list(METHODS))
def test_maps_match_pytorch_grad_cam(setup, method):
    spec, model, _, x, class_ids, refs = setup
    result = Explainer(model, method=method, guided=False)(x)
    assert [t.class_id for t in result.targets] == class_ids
    ref = refs[method]
    assert result.maps.shape == ref.shape == (2, 224, 224)
    # not degenerate: the maps differ (random weights may leave one photo's map all zero)
    assert np.isclose(ref.max(), 1, atol=1e-3) and np.abs(ref[0] - ref[1]).max() > 0.1
    diff = np.abs(result.maps.numpy() - ref).max()
    assert diff <= TOL, f"{spec} {method}: max |camframe - pytorch-grad-cam| = {diff:.3g}"


def test_eigencam_maps_the_reshaped_tokens(setup):
    """No gradient: the activation alone goes through ``feature_map``."""
    spec, model, ex, x, *_ = setup
    _, layer_of, transform = MODELS[spec]
    seen: list[Tensor] = []
    handle = layer_of(model).register_forward_hook(lambda m, i, o: seen.append(transform(o.detach())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    result = Explainer(model, method="eigencam", guided=False)(x)
    (layer_map,) = result.layer_maps.values()
    expected = eigencam(seen[0]).clamp(min=0)
    assert layer_map.shape == expected.shape == (2, *seen[0].shape[-2:])
    torch.testing.assert_close(layer_map, expected, atol=1e-5, rtol=1e-4)


def test_check_adapter_passes_and_restores_the_model(setup, photos):
    spec, model, *_ = setup
    model.train()
    try:
        result = check_adapter(model, photos[:1])
        assert result.adapter is not None and result.adapter.name == MODELS[spec][0]
        assert model.training and all(p.requires_grad for p in model.parameters())
    finally:
        model.eval()


def test_timm_model_from_the_command_line(photos, tmp_path):
    out = tmp_path / "out"
    assert _cli.main(["explain", str(photos[0]), "--model", "timm:deit_tiny_distilled_patch16_224", "--quiet",
                               "--weights", "random", "--out", str(out)]) == 0
    assert (out / "manifest.json").is_file()


def test_unknown_timm_model_and_missing_weights_are_one_line_errors():
    with pytest.raises(CamframeError, match="did you mean .*deit_tiny_patch16_224"):
        camframe.load_model("timm:deit_tiny_patch16_22")
    with pytest.raises(CamframeError, match="--weights random"):
        camframe.load_model("timm:deit_tiny_patch16_224")


class _TwiceAdapter(ClassifierAdapter):
    """A model calling one layer twice, on (B, tokens, C) tokens; records the names it is given."""

    def __init__(self) -> None:
        super().__init__(size=32)
        self.names: list[str] = []

    def feature_map(self, layer: str, tensor: Tensor) -> Tensor:
        self.names.append(layer)
        return tensor.reshape(len(tensor), 4, 4, tensor.shape[2]).permute(0, 3, 1, 2)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        return self.head(self.block(self.block(tokens).relu()).mean(1))


def test_feature_map_gets_the_module_name_of_each_call_and_the_gradients():
    torch.manual_seed(0)
    adapter = _TwiceAdapter()
    result = Explainer(_Twice(), layers=["block"], adapter=adapter, guided=False)(torch.rand(2, 3, 32, 32))
    assert set(result.layer_maps) == {"block#0", "block#1"}
    assert all(m.shape == (2, 4, 4) for m in result.layer_maps.values())
    # per call: the activation, then each gradient round (one target per image: one round)
    assert adapter.names == ["block", "block", "block", "block"]


def test_tokens_without_feature_map_are_refused_with_a_hint():
    with pytest.raises(CamframeError, match="feature_map"):
        Explainer(_Twice(), layers=["block"], adapter=ClassifierAdapter(size=32))(torch.rand(1, 3, 32, 32))


def test_timm_register_tokens_are_dropped_and_other_class_counts_have_no_names():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=4, num_classes=10).eval()
    assert model.num_prefix_tokens == 5  # the class token and four registers
    ex = Explainer(model, guided=False)
    result = ex(torch.rand(1, 3, 224, 224), target=[7])
    assert ex.adapter.categories is None and result.targets[0].class_name == "7"
    assert result.layer_maps["blocks.11.norm1"].shape == (1, 14, 14)
    assert bool(result.reached["blocks.11.norm1"].all())


def test_untrained_vit_says_its_head_is_zero():
    """torchvision zero-initialises a ViT's head: an untrained one's target is constant, and the error says why."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=16, num_classes=5)
    assert not vit.heads.head.weight.any()  # torchvision's own init
    with pytest.raises(CamframeError, match=r"^layer '.*' receives no gradient from the target; the weights of "
                                            r"'heads\.head' are all zero .*load trained weights$"):
        Explainer(vit)([np.zeros((64, 64, 3), np.uint8)])
    nn.init.normal_(vit.heads.head.weight)
    assert Explainer(vit)([np.zeros((64, 64, 3), np.uint8)]).maps.shape[0] == 1
