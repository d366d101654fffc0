"""Numerical agreement with pytorch-grad-cam on a real pretrained MobileNetV2 and a random resnet18.

The reference maps come from pytorch-grad-cam itself. To keep the suite fast, each model gets one
pytorch-grad-cam forward/backward (through ``GradCAM``); the other methods' references are computed
by their own pytorch-grad-cam classes from that same pass's recorded activations and gradients
(``compute_cam_per_layer`` + ``aggregate_multi_layers``, exactly what ``BaseCAM.forward`` does).
camframe runs its full pipeline once per method.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import (
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GuidedBackpropReLUModel,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from camframe import Explainer

METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "elementwise": HiResCAM,
    "elementwise-relu": GradCAMElementWise,
}
BATCH = ["chelsea", "coffee", "astronaut", "bus"]
TOL = 1e-4


def _reference_maps(model, layers, x, class_ids):
    """pytorch-grad-cam maps of every method in METHODS for ``layers`` (one forward/backward)."""
    ref_model = copy.deepcopy(model)
    named = dict(ref_model.named_modules())
    target_layers = [named[n] for n in layers]
    # backward only as deep as the target layers (their own weights keep requires_grad, so their
    # outputs do): the gradients at the layers are the same, the pass much cheaper
    ref_model.requires_grad_(False)
    for layer in target_layers:
        layer.requires_grad_(True)
    targets = [ClassifierOutputTarget(c) for c in class_ids]
    base = GradCAM(ref_model, target_layers)
    out = {"gradcam": base(x.clone(), targets)}
    assert len(base.activations_and_grads.gradients) == len(layers)
    for name, cls in METHODS.items():
        if name == "gradcam":
            continue
        cam = cls(ref_model, target_layers)
        own = cam.activations_and_grads
        own.release()
        cam.activations_and_grads = base.activations_and_grads
        out[name] = cam.aggregate_multi_layers(cam.compute_cam_per_layer(x, targets, False))
        cam.activations_and_grads = own  # its __del__ releases this one, not the shared recorder
    base.activations_and_grads.release()
    return out


def _setup(model, layer, paths):
    ex = Explainer(model, layers=[layer], guided=False)
    x, metas = ex.preprocess(paths)
    assert x.shape == (len(paths), 3, 224, 224)
    with torch.no_grad():
        class_ids = model(x).argmax(1).tolist()
    return x, class_ids, _reference_maps(model, [layer], x, class_ids)


@pytest.fixture(scope="module")
def batch_paths(images):
    return [images[n] for n in BATCH]


@pytest.fixture(scope="module")
def mobilenet_setup(mobilenet, batch_paths):
    return _setup(mobilenet, "features.18", batch_paths)


@pytest.fixture(scope="module")
def resnet_setup(resnet18_random, batch_paths):
    return _setup(resnet18_random, "layer4", batch_paths)


def _check(model, layer, setup, method):
    x, class_ids, refs = setup
    result = Explainer(model, layers=[layer], method=method, guided=False)(x, target=None)
    assert [t.class_id for t in result.targets] == class_ids
    maps = result.maps.detach().numpy()
    ref = refs[method]
    assert maps.shape == ref.shape == (4, 224, 224)
    # the reference is not degenerate: every map spans [0, 1]
    assert np.allclose(ref.max((1, 2)), 1, atol=1e-3) and np.allclose(ref.min((1, 2)), 0, atol=1e-3)
    diff = np.abs(maps - ref).max()
    assert diff <= TOL, f"{method} on {layer}: max |camframe - pytorch-grad-cam| = {diff:.3g}"


def test_mobilenet_predictions_are_sensible(mobilenet_setup):
    _, class_ids, _ = mobilenet_setup
    # 281..285 are ImageNet's domestic cats; 967 espresso
    assert 281 <= class_ids[0] <= 285
    assert class_ids[1] in (504, 967, 968)  # coffee mug, espresso, cup


@pytest.mark.parametrize("method", list(METHODS))
def test_mobilenet_v2_matches_pytorch_grad_cam(mobilenet, mobilenet_setup, method):
    _check(mobilenet, "features.18", mobilenet_setup, method)


@pytest.mark.parametrize("method", list(METHODS))
def test_resnet18_matches_pytorch_grad_cam(resnet18_random, resnet_setup, method):
    _check(resnet18_random, "layer4", resnet_setup, method)


def test_explicit_targets_match_pytorch_grad_cam(resnet18_random, resnet_setup):
    """Explicit class ids (not the top-1), three per image: targets are image-major rows."""
    x = resnet_setup[0][:2]
    classes = [0, 281, 999]
    result = Explainer(resnet18_random, layers=["layer4"], method="gradcam", guided=False)(x, target=classes)
    assert [(t.image, t.class_id) for t in result.targets] == [(b, c) for b in range(2) for c in classes]
    # the reference sees each image three times, once per class
    ref = _reference_maps(resnet18_random, ["layer4"], x.repeat_interleave(3, 0), classes * 2)["gradcam"]
    diff = np.abs(result.maps.numpy() - ref).max()
    assert diff <= TOL, diff
    # the three classes' maps of one image differ (the test would not see a mix-up otherwise)
    assert np.abs(ref[0] - ref[1]).max() > 0.1 and np.abs(ref[1] - ref[2]).max() > 0.1


def test_multi_layer_avg_same_resolution_matches_pytorch_grad_cam(mobilenet, mobilenet_setup):
    """Two layers at the same resolution: pytorch-grad-cam's mean of per-layer normalised maps,
    renormalised, equals camframe's ``avg`` aggregate with per-layer normalisation."""
    x, class_ids, _ = mobilenet_setup
    layers = ["features.17", "features.18"]
    result = Explainer(mobilenet, layers=layers, method="gradcam", aggregate="avg", guided=False,
                       normalise="layer")(x)
    assert [t.class_id for t in result.targets] == class_ids
    assert set(result.layer_maps) == set(layers)
    ref = _reference_maps(mobilenet, layers, x, class_ids)
    for method in ("gradcam",):
        diff = np.abs(result.maps.numpy() - ref[method]).max()
        assert diff <= TOL, f"{method}: {diff:.3g}"


def test_multi_layer_avg_different_resolutions_matches_pytorch_grad_cam(resnet18_random, resnet_setup):
    """layer3 (14x14) and layer4 (7x7): with ``normalise="layer"``, like pytorch-grad-cam, camframe
    normalises each layer's map at its own resolution, upsamples it, averages and renormalises."""
    x, class_ids, _ = resnet_setup
    layers = ["layer3", "layer4"]
    result = Explainer(resnet18_random, layers=layers, method="gradcam", aggregate="avg", guided=False,
                       normalise="layer")(x)
    ref = _reference_maps(resnet18_random, layers, x, class_ids)
    diff = np.abs(result.maps.numpy() - ref["gradcam"]).max()
    assert diff <= TOL, diff
    # and the two layers really differ, so a mix-up would show
    single = [Explainer(resnet18_random, layers=[n], method="gradcam", guided=False)(x).maps for n in layers]
    assert (single[0] - single[1]).abs().max() > 0.1


def test_guided_backprop_matches_pytorch_grad_cam(resnet18_random, resnet_setup):
    x, class_ids, _ = resnet_setup
    # camframe first, on the shared model; pytorch-grad-cam swaps ReLU modules, so give it a copy
    result = Explainer(resnet18_random, layers=["layer4"], guided=True)(x)
    assert result.guided is not None and result.guided.shape == (4, 3, 224, 224)
    assert [t.class_id for t in result.targets] == class_ids
    ref_model = copy.deepcopy(resnet18_random)
    for p in ref_model.parameters():  # input gradients only
        p.requires_grad_(False)
    reference = GuidedBackpropReLUModel(ref_model, device="cpu")
    for i, c in enumerate(class_ids):
        ref = reference(x[i:i + 1].clone(), target_category=c)  # (H, W, C)
        ours = result.guided[i].permute(1, 2, 0).numpy()
        assert np.abs(ref).max() > 1e-4  # a real, non-zero gradient
        diff = np.abs(ours - ref).max()
        assert diff <= 1e-5, f"image {i}: {diff:.3g}"
    # guided Grad-CAM is the product with the map
    torch.testing.assert_close(result.guided_gradcam, result.guided * result.maps[:, None])


def test_eigencam_is_pytorch_grad_cams_projection_with_a_sign_rule():
    """``eigencam`` is pytorch-grad-cam's ``get_2d_projection`` of the activations, times the sign that
    makes it agree with the mean centred activation; pytorch-grad-cam keeps the SVD's arbitrary sign."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from camframe.methods.weightings import eigencam

    torch.manual_seed(0)
    acts = torch.randn(200, 16, 7, 5).relu() + 0.1 * torch.randn(200, 16, 7, 5)
    ref = torch.from_numpy(get_2d_projection(acts.numpy().copy()))
    centred = acts - acts.mean((2, 3), keepdim=True)  # each channel centred over the positions
    agree = (ref * centred.mean(1)).sum((1, 2)) >= 0
    expected = torch.where(agree[:, None, None], ref, -ref)
    torch.testing.assert_close(eigencam(acts), expected, atol=1e-4, rtol=1e-3)
    assert 0 < int((~agree).sum()) < 200  # both signs occur: where they differ, camframe flips the map
