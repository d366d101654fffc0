"""The model comes back exactly as it came, whatever happens; odd models and targets work."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camframe import CamframeError, Explainer


class Pair(nn.Module):
    """Returns a tuple: (feature map, a scalar summary)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean()


class DictOut(nn.Module):
    """Returns a dict whose first entry is an integer tensor, then the feature map."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return {"count": torch.tensor(x.shape[0]), "feat": self.conv(x), "aux": x.sum()}


class Tripwire(nn.Module):
    """Identity that raises on its ``trip_at``-th call (1-based), to fail a pass midway."""

    def __init__(self) -> None:
        super().__init__()
        self.trip_at: int | None = None
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.trip_at is not None and self.calls == self.trip_at:
            raise RuntimeError("tripwire")
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)  # shared: called twice per forward
        self.pair = Pair(8)
        self.trip = Tripwire()
        self.block = DictOut(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        a, _ = self.pair(x)
        x = self.act(self.trip(a))
        x = self.block(x)["feat"]
        return self.head(self.drop(x.mean((2, 3))))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # non-trivial running statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.num_batches_tracked.fill_(7)
    net.train()
    net.head.eval()  # a mixed train/eval model; BatchNorm and Dropout in train mode
    net.stem.bias.requires_grad_(False)
    net.pair.conv.weight.requires_grad_(False)
    # user hooks that must survive untouched
    net.stem.register_forward_hook(lambda m, i, o: None)
    net.bn.register_forward_pre_hook(lambda m, i: None)
    net.head.register_full_backward_hook(lambda m, gi, go: None)
    return net


def snapshot(model: nn.Module) -> dict:
    modules = dict(model.named_modules())
    return {
        "modules": [(n, id(m), type(m)) for n, m in modules.items()],
        "children": {n: [(k, id(c)) for k, c in m._modules.items()] for n, m in modules.items()},
        "inplace": {n: m.inplace for n, m in modules.items() if hasattr(m, "inplace")},
        "training": {n: m.training for n, m in modules.items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                      len(m._backward_pre_hooks), len(m._forward_hooks_with_kwargs))
                  for n, m in modules.items()},
        "forward_overrides": {n: "forward" in vars(m) for n, m in modules.items()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad_mode": (torch.is_grad_enabled(), torch.is_inference_mode_enabled()),
        "function_modes": torch._C._len_torch_function_stack(),
        "global_hooks": (len(nn.modules.module._global_forward_hooks),
                         len(nn.modules.module._global_forward_pre_hooks),
                         len(nn.modules.module._global_backward_hooks)),
    }


def assert_restored(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in before:
        if key == "state":
            assert after["state"].keys() == before["state"].keys()
            for k, v in before["state"].items():
                assert torch.equal(after["state"][k], v), f"state {k} changed"
        else:
            assert after[key] == before[key], f"{key} changed"
    assert all(p.grad is None for p in model.parameters()), "a parameter has a .grad"


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def net():
    return make_net()


# --------------------------------------------------------------------------- restoration
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("method", ["elementwise", "gradcam", "eigencam"])
def test_explain_restores_model(net, guided, method):
    before = snapshot(net)
    result = Explainer(net, layers=["stem", "pair", "act", "block"], method=method, guided=guided)(X, target=[1, 3])
    assert result.maps.shape == (4, 12, 12)
    assert (result.guided is not None) == guided
    assert_restored(net, before)


def test_model_is_eval_and_frozen_only_while_explaining(net):
    seen = {}

    def target(outputs):
        seen["training"] = [m.training for m in net.modules()]
        seen["requires_grad"] = [p.requires_grad for p in net.parameters()]
        return outputs[:, 0]

    before = snapshot(net)
    Explainer(net, layers=["block"], guided=False)(X, target=target)
    assert not any(seen["training"]) and not any(seen["requires_grad"])
    assert_restored(net, before)


def test_explain_does_not_update_batchnorm_or_use_dropout(net):
    ref = copy.deepcopy(net).eval()
    ex = Explainer(net, layers=["block"], guided=False)
    a = ex(X, target=0)
    b = ex(X, target=0)
    torch.testing.assert_close(a.maps, b.maps)  # no dropout noise
    with torch.no_grad():
        assert a.targets[0].score == pytest.approx(float(ref(X)[0, 0]), abs=1e-5)


def test_target_callable_raising_restores(net):
    before = snapshot(net)

    def bad(outputs):
        raise ValueError("bad target")

    with pytest.raises(ValueError, match="bad target"):
        Explainer(net, layers=["block"], guided=True)(X, target=bad)
    assert_restored(net, before)


def test_target_callable_raising_on_scoring_restores(net):
    calls = []

    def second_call_fails(outputs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("fails when scoring")
        return outputs[:, 2]

    before = snapshot(net)
    with pytest.raises(ValueError, match="fails when scoring"):
        Explainer(net, layers=["block"], guided=True)(X, target=second_call_fails)
    assert_restored(net, before)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_module_raising_in_guided_pass_restores(net, exc, monkeypatch):
    """A module that works in a plain forward and raises in the guided one (maps and guided backprop
    share one forward run in guided mode)."""
    original = Tripwire.forward
    state = {"calls": 0}

    def forward(self, x):
        state["calls"] += 1
        if state["calls"] == 2:  # the 1st: a plain forward
            raise exc("guided pass failure")
        return original(self, x)

    before = snapshot(net)
    monkeypatch.setattr(Tripwire, "forward", forward)
    ex = Explainer(net, layers=["stem", "block"], guided=True)
    Explainer(net, layers=["stem", "block"], guided=False)(X)
    with pytest.raises(exc, match="guided pass failure"):
        ex(X)
    assert state["calls"] == 2
    monkeypatch.undo()
    assert_restored(net, before)
    # the explainer still works afterwards, and gives what a fresh one gives
    again = ex(X)
    fresh = Explainer(make_net(), layers=["stem", "block"], guided=True)(X)
    torch.testing.assert_close(again.maps, fresh.maps)
    torch.testing.assert_close(again.guided, fresh.guided)
    assert_restored(net, before)


def test_module_raising_in_normal_pass_restores(net):
    net.trip.trip_at = 1
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="tripwire"):
        Explainer(net, layers=["block"], guided=True)(X)
    assert_restored(net, before)


def test_failure_inside_context_manager_restores(net):
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="tripwire"):
        with Explainer(net, layers=["block"], guided=True) as ex:
            ex(X)
            net.trip.trip_at = net.trip.calls + 1  # the next call's (guided) forward
            ex(X)
    assert_restored(net, before)


def test_context_manager_restores(net):
    before = snapshot(net)
    with Explainer(net, layers=["pair", "block"], guided=True) as ex:
        assert not any(m.training for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters())
        first = ex(X, target=[0, 4])
        second = ex(X, target=[0, 4])
        torch.testing.assert_close(first.maps, second.maps)
        torch.testing.assert_close(first.guided, second.guided)
    assert_restored(net, before)
    outside = Explainer(net, layers=["pair", "block"], guided=True)(X, target=[0, 4])
    torch.testing.assert_close(first.maps, outside.maps)
    assert_restored(net, before)


def test_reentering_the_same_explainer_restores(net):
    """``with ex:`` inside ``with ex:``: camframe may refuse it, but on leaving the outer block the
    model must be exactly as it came (no leftover hook, training flags back)."""
    before = snapshot(net)
    ex = Explainer(net, layers=["block"], guided=False)
    with ex:
        try:
            with ex:
                ex(X)
        except (CamframeError, RuntimeError):
            pass
        # still inside the outer block: still explaining
        assert not any(m.training for m in net.modules()), "left explaining state inside the outer `with`"
        ex(X)
    assert_restored(net, before)


# --------------------------------------------------------------------------- grad modes
@pytest.fixture(scope="module")
def reference_result():
    net = make_net()
    return Explainer(net, layers=["pair", "block"], guided=True)(X, target=[2])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inside_no_grad_and_inference_mode(mode, reference_result):
    net = make_net()
    before = snapshot(net)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        inner_before = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        result = Explainer(net, layers=["pair", "block"], guided=True)(X, target=[2])
        assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == inner_before
    torch.testing.assert_close(result.maps, reference_result.maps)
    torch.testing.assert_close(result.guided, reference_result.guided)
    for k in reference_result.layer_maps:
        torch.testing.assert_close(result.layer_maps[k], reference_result.layer_maps[k])
    assert_restored(net, before)


def test_context_manager_entered_in_inference_mode(reference_result):
    net = make_net()
    before = snapshot(net)
    with torch.inference_mode(), Explainer(net, layers=["pair", "block"], guided=True) as ex:
        result = ex(X, target=[2])
    torch.testing.assert_close(result.maps, reference_result.maps)
    assert_restored(net, before)


def test_input_created_in_inference_mode(reference_result):
    with torch.inference_mode():
        x = X.clone()
    assert x.is_inference()
    result = Explainer(make_net(), layers=["pair", "block"], guided=True)(x, target=[2])
    torch.testing.assert_close(result.maps, reference_result.maps)
    torch.testing.assert_close(result.guided, reference_result.guided)


# --------------------------------------------------------------------------- layers
class Branchy(nn.Module):
    """``unused`` runs but the logits do not depend on it."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Conv2d(3, 4, 3, padding=1)
        self.unused = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        self.unused(x)
        return self.fc(self.used(x).mean((2, 3)))


@pytest.mark.parametrize("layers", [["unused"], ["used", "unused"]], ids=["alone", "with-another"])
def test_unreached_layer_error_names_it(layers):
    torch.manual_seed(0)
    with pytest.raises(CamframeError, match="'unused'"):
        Explainer(Branchy(), layers=layers, guided=False)(X, target=1)


@pytest.mark.parametrize("layers", [["unused"], ["used", "unused"]], ids=["alone", "with-another"])
def test_allow_unreached_gives_zero_map(layers):
    torch.manual_seed(0)
    model = Branchy()
    result = Explainer(model, layers=layers, guided=False, allow_unreached=True)(X, target=1)
    assert torch.count_nonzero(result.layer_maps["unused"]) == 0
    assert not bool(result.reached["unused"].any())
    if layers == ["unused"]:
        assert torch.count_nonzero(result.maps) == 0
    else:
        alone = Explainer(model, layers=["used"], guided=False)(X, target=1)
        torch.testing.assert_close(result.maps, alone.maps)  # the unreached layer takes no part


def test_unknown_layer_suggests_a_name(net):
    with pytest.raises(CamframeError, match=r"unknown layer 'stme'.*did you mean.*\bstem\b"):
        Explainer(net, layers=["stme"])
    with pytest.raises(CamframeError, match=r"unknown layer 'pair\.cnv'.*pair\.conv"):
        Explainer(net, layers=["pair.cnv"])


def test_layer_given_as_module(net):
    a = Explainer(net, layers=[net.block], guided=False)(X, target=0)
    b = Explainer(net, layers=["block"], guided=False)(X, target=0)
    assert list(a.layer_maps) == ["block"]
    torch.testing.assert_close(a.maps, b.maps)
    with pytest.raises(CamframeError, match="not a submodule"):
        Explainer(net, layers=[nn.Conv2d(1, 1, 1)])


def test_shared_module_gives_one_map_per_call(net):
    result = Explainer(net, layers=["act"], guided=False)(X, target=0)
    assert list(result.layer_maps) == ["act#0", "act#1"]
    assert list(result.reached) == ["act#0", "act#1"]
    for k in ("act#0", "act#1"):
        assert result.layer_maps[k].shape == (1 * 2, 12, 12)
        assert bool(result.reached[k].all())
    # the two calls see different activations, so the maps differ
    assert not torch.allclose(result.layer_maps["act#0"], result.layer_maps["act#1"])


# --------------------------------------------------------------------------- hand-computed maps
def hand_gradcam(model: nn.Module, module: nn.Module, x: torch.Tensor, score, pick=lambda o: o):
    """Grad-CAM by hand: activations from a forward hook (the module's output, before anything
    downstream may modify it in place), gradients by autograd, per image."""
    model = copy.deepcopy(model).eval()
    module = dict(model.named_modules())[module]
    maps = []
    for i in range(len(x)):
        store = {}

        def hook(m, inputs, output):
            a = pick(output)
            store["a"] = a.detach().clone()
            return output

        h = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                model(x[i:i + 1])
        finally:
            h.remove()
        a = store["a"].requires_grad_()

        def replace(m, inputs, output):
            # continue the forward from the recorded (leaf) activation
            if isinstance(output, torch.Tensor):
                return a.clone()
            if isinstance(output, tuple):
                return (a.clone(),) + tuple(output[1:])
            return {**output, "feat": a.clone()}

        h = module.register_forward_hook(replace)
        try:
            s = score(model(x[i:i + 1]))
        finally:
            h.remove()
        (g,) = torch.autograd.grad(s.sum(), a)
        cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1)).detach()
        maps.append(cam[0])
    return torch.stack(maps)


def _norm_up(cam: torch.Tensor, size) -> torch.Tensor:
    up = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    return (up - lo) / (hi - lo)


@pytest.mark.parametrize("layer,pick", [
    ("pair", lambda o: o[0]),
    ("block", lambda o: o["feat"]),
    ("bn", lambda o: o),  # followed by an in-place ReLU
], ids=["tuple", "dict", "before-inplace-relu"])
def test_tuple_dict_and_inplace_outputs_match_hand_gradcam(net, layer, pick):
    result = Explainer(net, layers=[layer], method="gradcam", guided=False)(X, target=3)
    expected = hand_gradcam(net, layer, X, lambda out: out[:, 3], pick)
    assert torch.count_nonzero(expected) > 0
    torch.testing.assert_close(result.layer_maps[layer], expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(result.maps, _norm_up(expected, (12, 12)), atol=1e-5, rtol=1e-4)


class Tiny(nn.Module):
    """A model no adapter knows: returns a dict, not logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(6, 6, 3, padding=1))
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        f = self.features(x)
        return {"heat": self.out(torch.relu(f)), "features": f}


def test_custom_target_callable_on_unknown_model():
    torch.manual_seed(3)
    model = Tiny()

    def centre_score(outputs):
        """Channel 1 of the heat map in the centre 2x2 cells, per image."""
        return outputs["heat"][:, 1, 2:4, 2:4].sum((1, 2))

    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    result = Explainer(model, layers=["features.2"], method="gradcam", guided=False)(x, target=centre_score)
    assert result.adapter is not None and result.adapter.name == "generic"
    assert [t.image for t in result.targets] == [0, 1, 2]
    assert all(t.class_id is None for t in result.targets)
    with torch.no_grad():
        expected_scores = centre_score(model(x))
    assert [t.score for t in result.targets] == pytest.approx(expected_scores.tolist(), abs=1e-5)
    expected = hand_gradcam(model, "features.2", x, centre_score)
    torch.testing.assert_close(result.layer_maps["features.2"], expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(result.maps, _norm_up(expected, (12, 12)), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- class ids
@pytest.mark.parametrize("ids", [
    [3, 1],
    (3, 1),
    ["3", "1"],
    [np.int64(3), np.int64(1)],
    np.array([3, 1]),
    torch.tensor([3, 1]),
], ids=["int-list", "int-tuple", "str-digits", "numpy-ints", "numpy-array", "tensor"])
def test_class_ids_of_common_types(net, ids):
    """Class ids as they come out of numpy/torch (``argsort``, ``topk``...) are class ids too."""
    result = Explainer(net, layers=["block"], guided=False)(X, target=ids)
    assert [(t.image, t.class_id) for t in result.targets] == [(0, 3), (0, 1), (1, 3), (1, 1)]
    assert all(type(t.class_id) is int for t in result.targets)


@pytest.mark.parametrize("one", [3, np.int64(3), torch.tensor(3)], ids=["int", "numpy-int", "0-d-tensor"])
def test_single_class_id_of_common_types(net, one):
    result = Explainer(net, layers=["block"], guided=False)(X, target=one)
    assert [(t.image, t.class_id) for t in result.targets] == [(0, 3), (1, 3)]


def test_explaining_in_a_loop_keeps_no_graph_alive(resnet18_random):
    """pytorch-grad-cam's memory growth in loops: nothing of a call's forward graph survives it."""
    import gc

    ex = Explainer(resnet18_random, layers=["layer4"], guided=False)
    with ex:
        for _ in range(3):
            ex(torch.randn(2, 3, 64, 64))
            assert ex._capture is not None and not ex._capture._calls  # no activation (and graph) kept
    gc.collect()
    before = len(gc.get_objects())
    with ex:
        for _ in range(5):
            ex(torch.randn(2, 3, 64, 64))
    gc.collect()
    assert len(gc.get_objects()) - before < 500
