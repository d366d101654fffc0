"""Aggregation of per-layer maps: the common scale (densities per input pixel) and the per-layer
min-max normalisation kept for parity with pytorch-grad-cam."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camframe import CamframeError, Explainer
from camframe.core.aggregate import aggregate, density, parse_aggregate, upsample
from camframe.evaluation.harness import Config

SIZE = (64, 64)


def _old_aggregate(maps, reached, size, how):
    """The aggregation camframe had before the common scale, verbatim in effect: min-max each
    layer at its own resolution, upsample, combine over the reached layers, min-max again."""
    def minmax(m):
        low, high = torch.aminmax(m.flatten(1), dim=1)
        span = high - low
        scale = torch.where(span > 1e-12, 1 / span.clamp(min=1e-12), torch.zeros_like(span))
        return (m - low[:, None, None]) * scale[:, None, None]

    layers = [F.interpolate(minmax(m)[:, None] * reached[n][:, None, None, None], size=size, mode="bilinear",
                            align_corners=False)[:, 0] for n, m in maps.items()]
    stack = torch.stack(layers)
    if how == "max":
        out = stack.amax(0)
    else:
        count = torch.stack([reached[n] for n in maps]).sum(0).clamp(min=1)
        out = stack.sum(0) / count[:, None, None]
    return minmax(out)


def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = {"fine": torch.rand(3, 16, 16, generator=g), "mid": torch.rand(3, 8, 8, generator=g) * 5,
            "coarse": torch.rand(3, 4, 4, generator=g) * 0.1}
    reached = {"fine": torch.tensor([True, True, False]), "mid": torch.tensor([True, False, True]),
               "coarse": torch.tensor([True, True, True])}
    return maps, reached


@pytest.mark.parametrize("low", [(4, 4), (8, 16), (16, 8), (32, 32)])
def test_density_keeps_each_maps_mass(low):
    m = torch.rand(2, *low)
    up = upsample(density(m, SIZE), SIZE)
    assert up.shape == (2, *SIZE)
    torch.testing.assert_close(up.sum((1, 2)), m.sum((1, 2)), rtol=1e-5, atol=0)
    # a constant map becomes a constant density: its value over the input pixels one cell covers
    flat = upsample(density(torch.ones(1, *low), SIZE), SIZE)
    torch.testing.assert_close(flat, torch.full((1, *SIZE), low[0] * low[1] / (SIZE[0] * SIZE[1])))


def test_weak_diffuse_layer_no_longer_dominates_max():
    """A fine layer with one strong cell and a coarse layer with weak evidence spread everywhere:
    per-layer min-max gives the weak layer the same peak, and max paints the whole map; on the
    common scale the strong evidence stands alone."""
    fine = torch.zeros(1, 16, 16)
    fine[0, 5, 9] = 10.0
    coarse = 0.1 + 0.01 * torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1))
    maps, reached = {"fine": fine, "coarse": coarse}, {"fine": torch.tensor([True]), "coarse": torch.tensor([True])}
    inside = torch.zeros(SIZE, dtype=torch.bool)
    inside[16:28, 32:44] = True  # the strong cell (rows 20-23, columns 36-39) and its bilinear spill
    layer = aggregate(maps, reached, SIZE, "max", "layer")[0]
    common = aggregate(maps, reached, SIZE, "max", "common")[0]
    assert layer[~inside].mean() > 0.4  # the weak layer paints everything outside the cell
    assert common[~inside].max() < 0.05 and common.max() == 1
    row, col = divmod(int(common.flatten().argmax()), SIZE[1])
    assert 20 <= row < 24 and 36 <= col < 40  # the peak is on the strong cell
    # the share of the map's mass on the strong cell's neighbourhood
    assert common[inside].sum() / common.sum() > 0.9 > 0.2 > layer[inside].sum() / layer.sum()


@pytest.mark.parametrize("how", ["max", "avg"])
def test_layer_normalisation_is_the_old_aggregation(how):
    maps, reached = _layers()
    torch.testing.assert_close(aggregate(maps, reached, SIZE, how, "layer"), _old_aggregate(maps, reached, SIZE, how),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("how", ["max", "avg"])
def test_common_scale_combines_densities_of_reached_layers(how):
    maps, reached = _layers()
    stack = torch.stack([upsample(density(m * reached[n][:, None, None], SIZE), SIZE) for n, m in maps.items()])
    if how == "max":
        expected = stack.amax(0)
    else:
        expected = stack.sum(0) / torch.stack(list(reached.values())).sum(0)[:, None, None]
    low, high = expected.flatten(1).aminmax(dim=1)
    expected = (expected - low[:, None, None]) / (high - low)[:, None, None]
    torch.testing.assert_close(aggregate(maps, reached, SIZE, how, "common"), expected, rtol=0, atol=1e-6)
    # an unreached layer takes no part: dropping it changes nothing
    assert not reached["mid"][1]
    rest = {n: m[1:2] for n, m in maps.items() if n != "mid"}
    torch.testing.assert_close(aggregate(rest, {n: reached[n][1:2] for n in rest}, SIZE, how, "common")[0],
                               aggregate(maps, reached, SIZE, how, "common")[1], rtol=0, atol=1e-6)


def test_one_layer_is_the_same_under_both_normalisations():
    """Upsampling is linear and min-max removes any scale: a single layer's map does not depend on it."""
    m = {"only": torch.rand(4, 7, 5) * 3}
    reached = {"only": torch.ones(4, dtype=torch.bool)}
    torch.testing.assert_close(aggregate(m, reached, (56, 40), "max", "common"),
                               aggregate(m, reached, (56, 40), "max", "layer"), rtol=0, atol=1e-5)


def test_aggregate_specs():
    assert parse_aggregate("max") == ("max", None)
    assert parse_aggregate("avg-layer") == ("avg", "layer")
    assert parse_aggregate("max-common") == ("max", "common")
    for bad in ["mean", "max-", "max-global", "avg-layer-x", ""]:
        with pytest.raises(CamframeError, match="unknown aggregate"):
            parse_aggregate(bad)


class _TwoScales(nn.Module):
    """A tiny classifier with feature maps at two resolutions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)
        nn.init.uniform_(self.fc.weight, 0.1, 1.0)  # positive evidence at both layers: neither map is all zero

    def forward(self, x):
        a = torch.relu(self.a(x))
        b = torch.relu(self.b(a))
        return self.fc(torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))


def test_explainer_normalise_option():
    model = _TwoScales()
    x = torch.rand(2, 3, 32, 32)
    default = Explainer(model, layers=["a", "b"], aggregate="max", guided=False)
    assert default.normalise == "layer"  # the adapters' default: the behaviour before the common scale
    results = {}
    for norm in ("common", "layer"):
        ex = Explainer(model, layers=["a", "b"], aggregate="avg", guided=False, normalise=norm)
        results[norm] = result = ex(x, target=[1])
        assert result.normalise == norm
        # computed here: each layer's map on its scale, bilinearly upsampled, averaged, min-max scaled once
        assert all(bool(r.all()) for r in result.reached.values())
        scaled = []
        for low in result.layer_maps.values():
            if norm == "layer":
                span = low.amax((1, 2), keepdim=True) - low.amin((1, 2), keepdim=True)
                assert bool((span > 0).all())
                low = (low - low.amin((1, 2), keepdim=True)) / span
            else:  # density per input pixel: one cell covers (32 / h) * (32 / w) pixels
                low = low * (low.shape[1] * low.shape[2] / (32 * 32))
            scaled.append(F.interpolate(low[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0])
        mean = torch.stack(scaled).mean(0)
        low, high = mean.amin((1, 2), keepdim=True), mean.amax((1, 2), keepdim=True)
        torch.testing.assert_close(result.maps, (mean - low) / (high - low), atol=1e-5, rtol=1e-4)
    assert (results["common"].maps - results["layer"].maps).abs().max() > 0.05
    with pytest.raises(CamframeError, match="unknown normalisation 'global'"):
        Explainer(model, layers=["a"], normalise="global")
    # evaluate's configurations carry the normalisation in the aggregate: max-common, avg-layer...
    ex = Config("elementwise", "a,b", "avg-common").explainer(model)
    assert (ex.aggregate, ex.normalise) == ("avg", "common")
    assert Config("elementwise", "a,b", "avg").explainer(model).normalise == "layer"
