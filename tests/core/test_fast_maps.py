"""The engine's fast paths give the maps a straightforward implementation gives: bilinear upsampling
as matrix products (``_resample``), the aggregation built on it, and the per-round map loop (no
copies of in-order gradients, slices for consecutive targets, ``reached`` without ``|g|``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camframe import Explainer
from camframe.core.aggregate import aggregate
from camframe.core.resample import _upsample_max_windows, resize_matrix, upsample_max, upsample_sum


def _interpolate(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(m.reshape(-1, 1, *m.shape[-2:]), size=size, mode="bilinear",
                         align_corners=False).reshape(*m.shape[:-2], *size)


def _reference_aggregate(maps, reached, size, how, normalise):
    """Each layer scaled, upsampled by ``F.interpolate`` and combined one by one, as camframe did."""
    def minmax(m):
        low, high = torch.aminmax(m.flatten(1), dim=1)
        span = high - low
        varies = span > 1e-6 * torch.maximum(high.abs(), low.abs())  # constant, relative to its magnitude
        scale = torch.where(varies, 1 / span.clamp(min=1e-38), torch.zeros_like(span))
        return (m - low[:, None, None]) * scale[:, None, None]

    layers, masks = [], []
    for name, low in maps.items():
        mask = reached[name].float()[:, None, None]
        low = minmax(low) * mask if normalise == "layer" else low * mask * (low.shape[-2] * low.shape[-1]
                                                                            / (size[0] * size[1]))
        layers.append(_interpolate(low, size))
        masks.append(mask)
    stack = torch.stack(layers)
    out = stack.amax(0) if how == "max" else stack.sum(0) / torch.stack(masks).sum(0).clamp(min=1)
    return minmax(out)


@pytest.mark.parametrize("size", [(320, 320), (224, 224), (96, 160), (32, 48)])
def test_upsample_sum_equals_interpolate(size):
    g = torch.Generator().manual_seed(0)
    shapes = [(size[0] // 8, size[1] // 8), (size[0] // 16, size[1] // 16), (size[0] // 8, size[1] // 8),
              (size[0] // 32 or 1, size[1] // 32 or 1), size]
    maps = [torch.rand(2, 3, *s, generator=g) for s in shapes]
    out = upsample_sum(maps, size)
    assert out.shape == (2, 3, *size)
    torch.testing.assert_close(out, sum(_interpolate(m, size) for m in maps), rtol=0, atol=1e-6)
    torch.testing.assert_close(upsample_sum(maps[1:2], size), _interpolate(maps[1], size), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(640, 640), (224, 224), (227, 301), (7, 9)])
def test_upsample_max_equals_interpolate(size):
    """The row-block fold gives the max of the separately upsampled maps, and their extremes; heights
    that are not a multiple of the block (227, 7) included."""
    g = torch.Generator().manual_seed(1)
    maps = [torch.rand(3, 7, 7, generator=g), 2 * torch.rand(3, 14, 14, generator=g) - 1,
            torch.rand(3, *size, generator=g), torch.rand(3, 20, 20, generator=g)]
    out, low, high = upsample_max(maps, size)
    expected = torch.stack([_interpolate(m, size) for m in maps]).amax(0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(low, expected.flatten(1).amin(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(high, expected.flatten(1).amax(1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(640, 640), (227, 301), (20, 20)])
def test_upsample_max_of_windows_equals_interpolate(size):
    """Maps that are zero outside small windows (per-box maps; windows at the edges, an all-zero map,
    a layer at the output's own size, one map non-zero everywhere) are folded window by window, with
    the same result and extremes as the separately upsampled maps."""
    g = torch.Generator().manual_seed(2)
    maps = []
    for h, w in [(5, 5), (10, 10), (20, 20), size]:
        m = torch.zeros(8, h, w)
        for u in range(6):
            r, c = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
            m[u, r:r + 3, max(0, c - 2):c + 1] = torch.rand(m[u, r:r + 3, max(0, c - 2):c + 1].shape, generator=g)
        m[6, 0, 0] = 1.0 if h > 5 else 0.0  # a corner; map 7 stays all zero
        maps.append(m)
    maps[0][5] = torch.rand(5, 5, generator=g) + 0.1  # covers the whole output
    out, low, high = _upsample_max_windows(maps, size)
    expected = torch.stack([_interpolate(m, size) for m in maps]).amax(0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(low, expected.flatten(1).amin(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(high, expected.flatten(1).amax(1), rtol=0, atol=1e-6)
    assert low[5] > 0 and high[7] == 0
    torch.testing.assert_close(upsample_max(maps, size)[0], out, rtol=0, atol=0)  # upsample_max took this path
    assert _upsample_max_windows([m - 1e-3 for m in maps], size) is None  # negative values: the row blocks
    assert _upsample_max_windows([torch.rand(8, 10, 10, generator=g)], size) is None  # dense maps too


def test_resize_matrix_rows_are_two_tap_convex_combinations():
    for n_in, n_out in [(7, 224), (20, 640), (13, 97), (640, 97)]:
        m = resize_matrix(n_in, n_out, torch.device("cpu"))
        assert m.shape == (n_out, n_in)
        assert ((m != 0).sum(1) <= 2).all() and (m >= 0).all()
        torch.testing.assert_close(m.sum(1), torch.ones(n_out))
    # non-integer scales: within float32 interpolate's own error (its source positions are float32)
    x = torch.rand(1, 13, 17)
    torch.testing.assert_close(upsample_sum([x], (97, 131)), _interpolate(x, (97, 131)), rtol=0, atol=2e-5)


@pytest.mark.parametrize("how", ["avg", "max"])
@pytest.mark.parametrize("normalise", ["common", "layer"])
def test_aggregate_equals_layer_by_layer_reference(how, normalise):
    g = torch.Generator().manual_seed(1)
    maps = {"p3": torch.rand(5, 80, 80, generator=g) ** 3, "p4": torch.rand(5, 40, 40, generator=g) * 4,
            "p4b": torch.rand(5, 40, 40, generator=g), "p5": torch.rand(5, 20, 20, generator=g) * 0.01,
            "zero": torch.zeros(5, 20, 20)}
    reached = {n: torch.rand(5, generator=g) > 0.3 for n in maps}
    reached["p5"][0] = False
    out = aggregate(maps, reached, (640, 640), how, normalise)
    torch.testing.assert_close(out, _reference_aggregate(maps, reached, (640, 640), how, normalise),
                               rtol=0, atol=1e-6)


def _straightforward(ex: Explainer, images, result):
    """Per target: its own forward and backward, the method on its own image's rows, ``reached`` from
    ``|g|``, then the reference aggregation."""
    x, _ = ex.preprocess(images)
    maps = {n: [] for n in result.layer_maps}
    reached = {n: [] for n in result.layer_maps}
    with ex, torch.enable_grad():
        for t in result.targets:
            with ex._capture.recording():
                outputs = ex.model(x.clone())
            acts = ex._capture.activations
            score = ex.adapter.score(outputs, [t]).sum()
            grads = torch.autograd.grad(score, list(acts.values()), allow_unused=True, materialize_grads=True)
            for (n, a), grad in zip(acts.items(), grads):
                i = slice(t.image, t.image + 1)
                maps[n].append(ex.method(a.detach()[i], grad[i]).clamp(min=0)[0])
                reached[n].append(bool(grad[i].abs().amax() > 0))
            ex._capture.reset()
    maps = {n: torch.stack(m) for n, m in maps.items()}
    reached = {n: torch.tensor(r) for n, r in reached.items()}
    return maps, reached, _reference_aggregate(maps, reached, tuple(x.shape[-2:]), ex.aggregate, ex.normalise)


@pytest.fixture(scope="module")
def yolo():
    from ultralytics import YOLO

    torch.manual_seed(0)
    return YOLO("yolov8n.yaml", verbose=False)


@pytest.mark.parametrize("grad_batch, how", [(1, "avg"), (2, "max")])
def test_explainer_maps_equal_a_straightforward_per_target_reference(yolo, images, grad_batch, how):
    pictures = [str(images["bus"]), str(images["zidane"])]
    # the square letterbox: both photos in one batch (predict()'s rectangles differ: two batches of one)
    ex = Explainer(yolo, options={"conf": 0.0, "max_det": 3, "imgsz": 128, "rect": False}, grad_batch=grad_batch,
                   aggregate=how)
    for batch in (pictures[:1], pictures):  # one image: in-order gradients, no copies; two: indexed rows
        result = ex(batch)
        assert len(result.targets) == 3 * len(batch)
        maps, reached, combined = _straightforward(ex, batch, result)
        for n in maps:
            assert torch.equal(result.reached[n], reached[n]), n
            torch.testing.assert_close(result.layer_maps[n], maps[n], rtol=1e-5, atol=1e-6 * float(maps[n].max()))
        torch.testing.assert_close(result.maps, combined, rtol=0, atol=1e-6)
