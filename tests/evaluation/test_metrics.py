import math

import pytest
import torch
from torch import nn

from camframe import metrics
from camframe.metrics import (
    box_masks,
    deletion_insertion,
    energy_pointing_game,
    mean_ci,
    object_discrimination,
    pointing_game,
    randomize_layers,
    sanity_check,
)

H = W = 10
BOX = torch.tensor([[2.0, 2.0, 6.0, 6.0]])  # covers pixels 2..5 in x and y
FILLS = ["blur", "mean", "noise", "zero"]


def blank(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, H, W)


def test_all_is_deliberate():
    assert set(metrics.__all__) == {
        "box_masks",
        "pointing_game",
        "energy_pointing_game",
        "object_discrimination",
        "deletion_insertion",
        "sanity_check",
        "randomize_layers",
        "mean_ci",
    }


# --------------------------------------------------------------------------- box_masks
def test_box_masks_uses_pixel_centres():
    m = box_masks(BOX, H, W)
    assert m.shape == (1, H, W) and m.dtype == torch.bool
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(m[0], expected)

    # x centres 2.5 and 3.5 are inside [2.4, 3.6]; only y centre 0.5 inside [0.4, 0.6]
    m = box_masks(torch.tensor([[2.4, 0.4, 3.6, 0.6]]), H, W)
    assert m.sum() == 2 and m[0, 0, 2] and m[0, 0, 3]
    # borders are inclusive; a box between centres covers nothing
    assert box_masks(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), H, W)[0].nonzero().tolist() == [[0, 0]]
    assert box_masks(torch.tensor([[0.6, 0.6, 1.4, 1.4]]), H, W).sum() == 0


def test_box_masks_batched_and_int_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 1, 1], [5, 0, 10, 2]])
    m = box_masks(boxes, H, W)
    assert m.sum(dim=(1, 2)).tolist() == [100, 1, 10]


# --------------------------------------------------------------------------- pointing game / EBPG
def test_map_inside_box_hits_and_has_full_energy():
    maps = blank()
    maps[0, 2:6, 2:6] = torch.rand(4, 4) + 0.1
    assert pointing_game(maps, BOX).tolist() == [True]
    assert energy_pointing_game(maps, BOX).item() == pytest.approx(1.0)


def test_map_outside_box_misses_and_has_zero_energy():
    maps = blank()
    maps[0, 7:, 7:] = 3.0
    maps[0, 0, 0] = 5.0
    assert pointing_game(maps, BOX).tolist() == [False]
    assert energy_pointing_game(maps, BOX).item() == 0.0


def test_half_half_energy_and_peak_location():
    maps = blank()
    maps[0, 2:6, 2:6] = 1.0  # 16 px inside, mass 16
    maps[0, 8, :8] = 2.0  # 8 px outside, mass 16, higher peak
    assert energy_pointing_game(maps, BOX).item() == pytest.approx(0.5)
    assert pointing_game(maps, BOX).tolist() == [False]
    maps[0, 3, 3] = 2.0  # a tied maximum inside the box counts
    assert pointing_game(maps, BOX).tolist() == [True]


def test_all_zero_map_is_miss_with_zero_energy():
    maps = blank(2)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 6.0, 6.0]])
    assert pointing_game(maps, boxes).tolist() == [False, False]
    e = energy_pointing_game(maps, boxes)
    assert e.tolist() == [0.0, 0.0] and not e.isnan().any()


def test_masks_match_equivalent_boxes():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(16, H, W, generator=g) ** 4
    xy = torch.randint(0, 6, (16, 2), generator=g).float()
    wh = torch.randint(1, 5, (16, 2), generator=g).float()
    boxes = torch.cat([xy, xy + wh], dim=1)
    masks = box_masks(boxes, H, W)
    for tol in (0, 1, 3):
        assert torch.equal(
            pointing_game(maps, boxes=boxes, tolerance=tol),
            pointing_game(maps, masks=masks.float(), tolerance=tol),
        )
    assert torch.allclose(energy_pointing_game(maps, boxes), energy_pointing_game(maps, masks=masks))
    # the test must exercise both outcomes to mean anything
    hits = pointing_game(maps, boxes)
    assert hits.any() and not hits.all()


def test_pointing_tolerance():
    maps = blank(2)
    maps[0, 3, 7] = 1.0  # two pixels right of the box (box covers x <= 5)
    maps[1, 7, 7] = 1.0  # (2, 2) pixels diagonally off the corner (5, 5): distance 2.83
    boxes = BOX.expand(2, 4)
    assert pointing_game(maps, boxes, tolerance=0).tolist() == [False, False]
    assert pointing_game(maps, boxes, tolerance=1).tolist() == [False, False]
    assert pointing_game(maps, boxes, tolerance=2).tolist() == [True, False]
    assert pointing_game(maps, boxes, tolerance=3).tolist() == [True, True]
    masks = box_masks(boxes, H, W)
    assert pointing_game(maps, masks=masks, tolerance=2).tolist() == [True, False]
    with pytest.raises(ValueError):
        pointing_game(maps, boxes, tolerance=-1)


def test_region_arguments_are_validated():
    maps = blank()
    with pytest.raises(ValueError):
        energy_pointing_game(maps)
    with pytest.raises(ValueError):
        energy_pointing_game(maps, boxes=BOX, masks=box_masks(BOX, H, W))
    with pytest.raises(ValueError):
        pointing_game(maps, masks=torch.ones(1, H, W + 1))


# --------------------------------------------------------------------------- object discrimination
OWN = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
OTHER = torch.tensor([[6.0, 6.0, 10.0, 10.0]])


def test_object_discrimination_known_values():
    maps = blank(4)
    maps[0, :4, :4] = 1.0  # only on its own object
    maps[1, 6:, 6:] = 1.0  # only on the other object
    maps[2, :4, :4] = 1.0  # half/half
    maps[2, 6:, 6:] = 1.0
    maps[3, :4, :4] = 1.0  # background mass does not count
    maps[3, 6:, 6:] = 1.0
    maps[3, 4:6, :] = 100.0
    out = object_discrimination(maps, OWN.expand(4, 4), [OTHER] * 4)
    assert out.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.5])


def test_object_discrimination_edge_cases_are_nan_free():
    maps = blank(4)
    maps[0, 6:, 6:] = 1.0  # mass on a box, but no other objects given
    maps[1, 5, 5] = 1.0  # mass only outside all objects
    # maps[2] is all zero
    maps[3, 6:, 6:] = 1.0  # other object overlapping own box: overlap counts as own
    others = [torch.zeros(0, 4), OTHER, OTHER, torch.tensor([[0.0, 0.0, 10.0, 10.0], [6.0, 6.0, 10.0, 10.0]])]
    boxes = torch.cat([OTHER, OWN, OWN, torch.tensor([[6.0, 6.0, 8.0, 10.0]])])
    out = object_discrimination(maps, boxes, others)
    assert not out.isnan().any()
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5])


# --------------------------------------------------------------------------- deletion / insertion
def constant_score(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), 0.7)


S = 32
REGION = (slice(None), slice(None), slice(12, 16), slice(12, 16))


def region_score(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Mean intensity inside a 4x4 patch in the middle of an S x S image."""
    return x[REGION].mean(dim=(1, 2, 3))


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_constant_model_gives_flat_curve(fill, mode):
    images = torch.rand(3, 3, H, W)
    maps = torch.rand(3, H, W)
    curve, auc = deletion_insertion(images, maps, constant_score, steps=5, mode=mode, fill=fill)
    assert curve.shape == (3, 6)
    assert torch.allclose(curve, torch.ones(3, 6))
    assert torch.allclose(auc, torch.ones(3))


@pytest.mark.parametrize("fill", ["blur", "mean"])
def test_blur_and_mean_fill_keep_a_constant_image(fill):
    images = torch.full((2, 3, H, W), 0.6)
    mean_score = lambda x, s: x.mean(dim=(1, 2, 3))  # noqa: E731
    curve, _ = deletion_insertion(images, torch.rand(2, H, W), mean_score, steps=4, fill=fill)
    assert torch.allclose(curve, torch.ones_like(curve))


@pytest.mark.parametrize("fill", FILLS)
def test_right_map_beats_wrong_map(fill):
    torch.manual_seed(0)
    images = torch.rand(4, 3, S, S) * 0.5 + 0.5
    images[REGION] += 1.0  # the scored patch is bright, so every fill lowers it
    right = torch.rand(4, S, S) * 0.1
    right[REGION[1:]] += 1.0  # the scored patch ranked first
    wrong = right.roll(shifts=(S // 2, S // 2), dims=(1, 2))  # a bright patch elsewhere
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    kw = dict(steps=16, fill=fill)
    _, del_right = deletion_insertion(images, right, region_score, mode="deletion", generator=gen(), **kw)
    _, del_wrong = deletion_insertion(images, wrong, region_score, mode="deletion", generator=gen(), **kw)
    _, ins_right = deletion_insertion(images, right, region_score, mode="insertion", generator=gen(), **kw)
    _, ins_wrong = deletion_insertion(images, wrong, region_score, mode="insertion", generator=gen(), **kw)
    assert (del_right < del_wrong - 0.05).all()
    assert (ins_right > ins_wrong + 0.05).all()


def test_curve_shape_normalisation_and_exact_step_sizes():
    images = torch.ones(2, 1, H, W)
    maps = torch.rand(2, H, W)
    frac_kept = lambda x, s: (x != 0).float().mean(dim=(1, 2, 3)) + 1.0  # noqa: E731

    curve, auc = deletion_insertion(images, maps, frac_kept, steps=4, mode="deletion", fill="zero")
    assert curve.shape == (2, 5) and torch.all(curve[:, 0] == 1.0)
    # 25 pixels removed per step: scores 2, 1.75, 1.5, 1.25, 1 -> normalised by 2
    assert torch.allclose(curve, torch.tensor([1.0, 0.875, 0.75, 0.625, 0.5]).expand(2, 5))
    assert torch.allclose(auc, torch.full((2,), 0.75))

    curve, auc = deletion_insertion(images, maps, frac_kept, steps=4, mode="insertion", fill="zero")
    assert torch.allclose(curve, torch.tensor([0.5, 0.625, 0.75, 0.875, 1.0]).expand(2, 5))
    assert torch.allclose(auc, torch.full((2,), 0.75))

    curve, _ = deletion_insertion(images, maps, frac_kept, steps=7, fill="zero")
    assert curve.shape == (2, 8)


def test_pixels_removed_in_saliency_order_with_deterministic_ties():
    images = torch.ones(1, 1, H, W)
    maps = torch.zeros(1, H, W)
    maps[0, 9, 9] = 2.0
    maps[0, 0, 5] = 1.0
    seen = []
    record = lambda x, s: seen.append(x.clone()) or torch.ones(len(x))  # noqa: E731
    deletion_insertion(images, maps, record, steps=100, fill="zero")
    batch = torch.cat(seen)
    assert batch.shape[0] == 101
    assert batch[0].sum() == 100
    assert batch[1, 0, 9, 9] == 0 and batch[1].sum() == 99
    assert batch[2, 0, 0, 5] == 0 and batch[2].sum() == 98
    assert batch[3, 0, 0, 0] == 0 and batch[3].sum() == 97  # first tie in raster order


def test_score_fn_receives_source_indices():
    n, steps = 5, 6
    images = (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, 2, H, W).clone()
    calls = []

    def score(x, src):
        assert src.dtype == torch.long and src.shape == (x.shape[0],)
        values = (src + 1).float().view(-1, 1, 1, 1)
        assert torch.all((x == 0) | (x == values))  # every row comes from its source image
        calls.append(src.clone())
        return x.amax(dim=(1, 2, 3)) + 1.0

    curve, _ = deletion_insertion(images, torch.rand(n, H, W), score, steps=steps, fill="zero", batch_size=4)
    src = torch.cat(calls)
    assert torch.equal(src.bincount(minlength=n), torch.full((n,), steps + 1))
    # normalised by each image's own score: last step (all zeros) scores 1 / (i + 2)
    assert torch.allclose(curve[:, -1], 1.0 / (torch.arange(n) + 2.0))


def test_batched_scoring_respects_batch_size():
    n, steps, batch_size = 64, 20, 64
    images = torch.rand(n, 3, 64, 64)
    maps = torch.rand(n, 64, 64)
    sizes = []

    def score(x, src):
        sizes.append(x.shape[0])
        return x.mean(dim=(1, 2, 3))

    curve, auc = deletion_insertion(images, maps, score, steps=steps, batch_size=batch_size)
    assert max(sizes) <= batch_size
    assert sum(sizes) == n * (steps + 1)
    assert len(sizes) == math.ceil(n * (steps + 1) / batch_size)
    assert curve.shape == (n, steps + 1) and auc.shape == (n,)


def test_result_does_not_depend_on_batch_size():
    images, maps = torch.rand(3, 3, H, W), torch.rand(3, H, W)
    score = lambda x, s: x[:, 0].mean(dim=(1, 2)) + s  # noqa: E731
    a = deletion_insertion(images, maps, score, steps=5, batch_size=1)
    b = deletion_insertion(images, maps, score, steps=5, batch_size=1000)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_noise_fill_uses_generator_and_channel_range():
    images = torch.rand(2, 3, H, W)
    images[:, 1] = images[:, 1] * 10 + 5  # channel 1 lies in [5, 15]
    lo = images.amin(dim=(2, 3), keepdim=True)
    hi = images.amax(dim=(2, 3), keepdim=True)

    def score(x, src):
        assert torch.all((x >= lo[src] - 1e-6) & (x <= hi[src] + 1e-6))
        return x.sum(dim=(1, 2, 3))

    maps = torch.rand(2, H, W)
    run = lambda seed: deletion_insertion(  # noqa: E731
        images, maps, score, steps=4, fill="noise", generator=torch.Generator().manual_seed(seed)
    )[0]
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_zero_original_score_gives_nan_curve_row():
    images = torch.rand(2, 1, H, W)
    score = lambda x, s: s.float()  # noqa: E731  (image 0 always scores 0)
    curve, auc = deletion_insertion(images, torch.rand(2, H, W), score, steps=3)
    assert curve[0].isnan().all() and auc[0].isnan()
    assert torch.allclose(curve[1], torch.ones(4))


def test_deletion_insertion_validates_inputs():
    images, maps = torch.rand(1, 3, H, W), torch.rand(1, H, W)
    with pytest.raises(ValueError):
        deletion_insertion(images, torch.rand(1, 5, 5), constant_score)
    with pytest.raises(ValueError):
        deletion_insertion(images, maps, constant_score, mode="erase")
    with pytest.raises(ValueError):
        deletion_insertion(images, maps, constant_score, fill="grey")
    with pytest.raises(ValueError):
        deletion_insertion(images, maps, lambda x, s: torch.ones(len(x) + 1))


def zeros_per_row(seen: list) -> metrics.ScoreFn:
    """A score_fn recording how many pixels of each row were filled (zero fill, images of ones)."""
    def score(x, src):
        seen.append((x == 0).sum(dim=(1, 2, 3)))
        return (x != 0).float().mean(dim=(1, 2, 3)) + 1.0
    return score


def test_box_schedule_steps_in_units_of_the_area():
    images = torch.ones(2, 1, H, W)
    seen = []
    curve, auc = deletion_insertion(images, torch.rand(2, H, W), zeros_per_row(seen), steps=4, fill="zero",
                                    area=torch.tensor([10.0, 30.0]), extent=2.0)
    # k * 2 * area / 4 pixels per step: 5 px for the 10 px box, 15 px for the 30 px one
    assert torch.cat(seen).view(2, 5).tolist() == [[0, 5, 10, 15, 20], [0, 15, 30, 45, 60]]
    assert torch.allclose(curve[0], torch.tensor([1.0, 0.975, 0.95, 0.925, 0.9]))
    assert torch.allclose(auc, torch.tensor([0.95, 0.85]))


def test_box_schedule_is_capped_at_the_image():
    seen = []
    deletion_insertion(torch.ones(1, 1, H, W), torch.rand(1, H, W), zeros_per_row(seen), steps=2, fill="zero",
                       area=torch.tensor([80.0]), extent=2.0)
    assert torch.cat(seen).tolist() == [0, 80, 100]


def test_box_schedule_insertion_is_relative_to_the_unperturbed_image():
    seen = []
    curve, _ = deletion_insertion(torch.ones(1, 1, H, W), torch.rand(1, H, W), zeros_per_row(seen), steps=2,
                                  mode="insertion", fill="zero", area=torch.tensor([10.0]), extent=2.0)
    # 0, 10 and 20 pixels revealed, then the unperturbed image (score 2) scored once more
    assert torch.cat(seen).tolist() == [100, 90, 80, 0]
    assert torch.allclose(curve[0], torch.tensor([0.5, 0.55, 0.6]))


def test_a_vanished_target_scores_zero_not_nan():
    images = torch.ones(1, 1, H, W)
    maps = torch.zeros(1, H, W)
    maps[0, 2:4, 2:4] = 1.0  # the map marks the 4-pixel target first
    present = lambda x, s: (x[:, 0, 2:4, 2:4] != 0).flatten(1).all(1).float()  # noqa: E731
    curve, auc = deletion_insertion(images, maps, present, steps=4, fill="zero", area=torch.tensor([4.0]))
    # 2 pixels of it are filled at step 1: the score drops to 0 there and stays 0, a valid point of the curve
    assert curve[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0] and auc.item() == pytest.approx(0.125)


def test_box_schedule_validates_area_and_extent():
    images, maps = torch.rand(2, 3, H, W), torch.rand(2, H, W)
    for area in (torch.tensor([4.0]), torch.tensor([4.0, 0.0]), torch.tensor([4.0, math.inf])):
        with pytest.raises(ValueError, match="area"):
            deletion_insertion(images, maps, constant_score, area=area)
    with pytest.raises(ValueError, match="extent"):
        deletion_insertion(images, maps, constant_score, area=torch.tensor([4.0, 4.0]), extent=0.0)


# --------------------------------------------------------------------------- sanity checks
def test_sanity_check_known_correlations():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=g)
    assert torch.allclose(sanity_check(a, a), torch.ones(3))
    assert torch.allclose(sanity_check(a, a**3 + 2), torch.ones(3))  # rank-based
    assert torch.allclose(sanity_check(a, -a), -torch.ones(3))
    shuffled = a.flatten(1).flip(1).view_as(a)
    assert torch.allclose(sanity_check(a, shuffled), sanity_check(shuffled, a))  # symmetric
    b = torch.rand(3, 32, 32, generator=g)
    assert sanity_check(a, b).abs().max() < 0.15


def test_sanity_check_uses_average_ranks_for_ties():
    a = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # average ranks give exactly 0 here; raster-order tie breaking would give 0.4
    assert sanity_check(a, b).item() == pytest.approx(0.0, abs=1e-7)
    c = torch.tensor([[[0.0, 0.0], [0.0, 3.0]]])
    assert sanity_check(c, c * 5).item() == pytest.approx(1.0)


def test_sanity_check_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 4, (4, 8, 8), generator=g).float()
    b = torch.relu(torch.randn(4, 8, 8, generator=g) + a * 0.3)
    expected = [stats.spearmanr(x.flatten().numpy(), y.flatten().numpy())[0] for x, y in zip(a, b)]
    assert sanity_check(a, b).tolist() == pytest.approx(expected, abs=1e-6)


def test_sanity_check_constant_map_is_nan():
    a = torch.rand(2, 4, 4)
    b = a.clone()
    b[0] = 0.0
    out = sanity_check(a, b)
    assert out[0].isnan() and out[1] == pytest.approx(1.0)


def make_model() -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def test_randomize_layers_changes_only_named_layers():
    model = make_model()
    with torch.no_grad():
        model[2][1].weight.fill_(3.0)  # so the BatchNorm reset is visible
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()

    rand = randomize_layers(model, ["4", "2"], seed=7)

    assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched
    for k, v in model.state_dict().items():  # original untouched
        assert torch.equal(v, before[k])
    after = rand.state_dict()
    for k in ("0.weight", "0.bias"):
        assert torch.equal(after[k], before[k])
    for k in ("4.weight", "4.bias", "2.0.weight", "2.0.bias"):
        assert not torch.equal(after[k], before[k])
    assert torch.equal(after["2.1.weight"], torch.ones(4))
    assert rand is not model and rand[4] is not model[4]

    again = randomize_layers(model, ["4", "2"], seed=7)
    other = randomize_layers(model, ["4", "2"], seed=8)
    assert torch.equal(again[4].weight, rand[4].weight)
    assert not torch.equal(other[4].weight, rand[4].weight)


def test_randomize_layers_unknown_name_and_uncovered_params():
    model = make_model()
    with pytest.raises(AttributeError):
        randomize_layers(model, ["nope"])

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

    wrapped = nn.Sequential(Scale())
    with pytest.warns(UserWarning, match="0.gain"):
        out = randomize_layers(wrapped, ["0"])
    assert torch.equal(out[0].gain, torch.ones(3))


# --------------------------------------------------------------------------- mean_ci
def test_mean_ci_constant_values_have_zero_width():
    assert mean_ci([0.4] * 10) == pytest.approx((0.4, 0.4, 0.4))


def test_mean_ci_t_interval():
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = 4.303 / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    _, lo99, hi99 = mean_ci(torch.tensor([1.0, 2.0, 3.0]), confidence=0.99)
    assert hi99 == pytest.approx(2.0 + 9.925 / math.sqrt(3))
    assert lo99 < lo


def test_mean_ci_large_sample_and_nan_handling():
    values = torch.tensor([0.0, 1.0] * 20 + [float("nan")] * 3)  # n = 40 after dropping NaN
    mean, lo, hi = mean_ci(values)
    se = values[~values.isnan()].std().item() / math.sqrt(40)
    assert mean == pytest.approx(0.5)
    assert (hi - mean) / se == pytest.approx(2.0227, abs=1e-3)  # t_{0.975, 39}
    assert mean_ci([float("nan"), 5.0]) == (5.0, 5.0, 5.0)
    assert all(math.isnan(v) for v in mean_ci([]))
    with pytest.raises(ValueError):
        mean_ci([1.0, 2.0], confidence=0.5)


def test_bounded_mean_ci_stays_in_its_bounds():
    # 9 hits of 10: the t interval reaches 1.18; the Wilson score interval (analytic) stays below 1
    mean, lo, hi = mean_ci([1.0] * 9 + [0.0])
    assert hi > 1
    z, p, n = 1.959964, 0.9, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert mean_ci([1.0] * 9 + [0.0], bounds=(0.0, 1.0)) == pytest.approx((0.9, centre - half, centre + half))
    assert centre + half < 1
    assert mean_ci([1.0] * 5, bounds=(0.0, 1.0))[1:] == pytest.approx((1 - z * z / (5 + z * z), 1.0))
    # shares: the t interval cut at the bounds
    shares = [0.99, 0.97, 1.0, 0.6, 0.98]
    _, t_lo, t_hi = mean_ci(shares)
    assert t_hi > 1 and mean_ci(shares, bounds=(0.0, 1.0)) == pytest.approx((sum(shares) / 5, t_lo, 1.0))
    with pytest.raises(ValueError, match=r"in \[0.0, 1.0\]"):
        mean_ci([0.5, 1.2], bounds=(0.0, 1.0))
