"""Each plugin hook, through the public API, as docs/hooks.md documents it.

Every test registers a tiny plugin object on ``camframe.plugins.manager.pm`` (after camframe's own
plugins are loaded, so it is the latest registered) and unregisters it afterwards.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camframe
from camframe import ClassifierAdapter, Explainer
from camframe.plugins import manager as _plugins

GEN = torch.Generator().manual_seed(0)
X = torch.randn(2, 3, 8, 8, generator=GEN) * 2


class Tiny(nn.Module):
    """conv -> ReLU -> global mean -> 3 logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def register():
    """``register(plugin)`` adds a plugin to the live manager; all are removed after the test."""
    pm = _plugins._manager()  # built-ins and entry points first
    added = []

    def add(plugin):
        pm.register(plugin, name=f"test-hooks-{len(added)}-{type(plugin).__name__}")
        added.append(plugin)
        return plugin

    yield add
    for plugin in reversed(added):
        pm.unregister(plugin)


def conv_activations_and_gradients(model: Tiny, x: torch.Tensor, classes: torch.Tensor):
    """The conv layer's output A and d(logit of each image's class)/dA, computed by hand."""
    a = model.conv(x).detach().requires_grad_()
    logits = model.fc(F.relu(a).mean((2, 3)))
    (g,) = torch.autograd.grad(logits[torch.arange(len(x)), classes].sum(), a)
    return a.detach(), g


# --------------------------------------------------------------------------- camframe_adapters
class NamedAdapter(ClassifierAdapter):
    def __init__(self, name: str, priority: int, matches: bool) -> None:
        super().__init__(size=8)
        self.name, self.priority, self._matches = name, priority, matches

    def matches(self, model):
        return self._matches and isinstance(model, Tiny)

    def layers(self, model):
        return ["conv"]


class AdapterPlugin:
    def __init__(self, adapter: camframe.Adapter) -> None:
        self.adapter = adapter

    @camframe.hookimpl
    def camframe_adapters(self):
        return [self.adapter]


@pytest.mark.hook("camframe_adapters")
def test_camframe_adapters_priority_then_later_plugin_first(register):
    register(AdapterPlugin(NamedAdapter("hooks-first", 5, True)))
    register(AdapterPlugin(NamedAdapter("hooks-second", 5, True)))
    register(AdapterPlugin(NamedAdapter("hooks-low", -50, True)))
    names = [a.name for a in _plugins.adapters()]
    assert names.index("hooks-second") < names.index("hooks-first") < names.index("hooks-low")
    assert names[-1] == "generic"
    assert Explainer(Tiny()).adapter.name == "hooks-second"  # highest priority, registered last


@pytest.mark.hook("camframe_adapters")
def test_camframe_adapters_third_party_default_priority_beats_builtin(register):
    adapter = NamedAdapter("hooks-default", 0, True)
    del adapter.priority  # the class default
    assert adapter.priority == 0
    register(AdapterPlugin(adapter))
    ex = Explainer(Tiny())
    assert ex.adapter.name == "hooks-default"
    assert ex.adapter is not adapter  # each Explainer works on a copy of the registered adapter


@pytest.mark.hook("camframe_adapters")
def test_camframe_adapters_explicit_name_wins(register):
    register(AdapterPlugin(NamedAdapter("hooks-chosen", -200, True)))  # matches, but below the generic one
    register(AdapterPlugin(NamedAdapter("hooks-other", -90, False)))  # matches nothing
    assert Explainer(Tiny()).adapter.name == "generic"
    assert Explainer(Tiny(), adapter="hooks-chosen").adapter.name == "hooks-chosen"
    with pytest.raises(camframe.CamframeError, match="adapter 'hooks-other' does not fit a model of type Tiny"):
        Explainer(Tiny(), adapter="hooks-other")
    with pytest.raises(camframe.CamframeError, match="unknown adapter 'hooks-nope'.*hooks-chosen"):
        Explainer(Tiny(), adapter="hooks-nope")


# --------------------------------------------------------------------------- camframe_methods
@camframe.method()
def gradmax(activations, gradients):
    weights = gradients.amax(dim=(2, 3))
    return (weights[:, :, None, None] * activations).sum(1)


@camframe.method(gradients=False)
def mean_activation(activations, gradients=None):
    return activations.mean(1)


@camframe.method()
def sevens(activations, gradients):
    return torch.full((len(activations), *activations.shape[2:]), 7.0)


class MethodsPlugin:
    def __init__(self, methods: dict) -> None:
        self.methods = methods

    @camframe.hookimpl
    def camframe_methods(self):
        return self.methods


@pytest.mark.hook("camframe_methods")
def test_camframe_methods_gradient_method(register):
    register(MethodsPlugin({"gradmax": gradmax}))
    model = Tiny()
    result = Explainer(model, layers=["conv"], method="gradmax", guided=False)(X, target=[1])
    a, g = conv_activations_and_gradients(model, X, torch.tensor([1, 1]))
    want = (g.amax(dim=(2, 3))[:, :, None, None] * a).sum(1).clamp(min=0)
    torch.testing.assert_close(result.layer_maps["conv"], want)
    assert result.method == "gradmax"


@pytest.mark.hook("camframe_methods")
def test_camframe_methods_gradient_free_method(register):
    register(MethodsPlugin({"mean-activation": mean_activation}))
    model = Tiny()
    result = Explainer(model, layers=["conv"], method="mean-activation", guided=False)(X)
    torch.testing.assert_close(result.layer_maps["conv"], model.conv(X).detach().mean(1).clamp(min=0))
    assert bool(result.reached["conv"].all())


@pytest.mark.hook("camframe_methods")
def test_camframe_methods_plugin_can_replace_a_builtin(register):
    builtin = Explainer(Tiny(), layers=["conv"], method="gradcam", guided=False)(X).layer_maps["conv"]
    assert not torch.all(builtin == 7)
    plugin = register(MethodsPlugin({"gradcam": sevens}))
    assert _plugins.methods()["gradcam"] is sevens
    replaced = Explainer(Tiny(), layers=["conv"], method="gradcam", guided=False)(X).layer_maps["conv"]
    assert torch.all(replaced == 7)
    _plugins.pm.unregister(plugin)
    try:
        assert _plugins.methods()["gradcam"] is not sevens
    finally:
        _plugins.pm.register(plugin, name="test-hooks-reregistered")  # the fixture unregisters it


@pytest.mark.hook("camframe_methods")
def test_camframe_methods_unknown_method_lists_plugin_methods(register):
    register(MethodsPlugin({"gradmax": gradmax}))
    with pytest.raises(camframe.CamframeError, match="unknown method 'nope'.*gradmax"):
        Explainer(Tiny(), layers=["conv"], method="nope")


# --------------------------------------------------------------------------- camframe_guided_rules
class Soft(nn.Module):
    def forward(self, x):
        return F.softplus(x)


class SoftModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = Soft()

    def forward(self, x):
        return self.act(x)


W = torch.randn(3, 8, 8, generator=GEN)  # dL/dy at the activation, both signs


def weighted_sum(outputs):
    return (outputs * W).sum((1, 2, 3))


class SoftplusRule:
    @camframe.hookimpl
    def camframe_guided_rules(self):
        return [F.softplus]


def guided_gradient():
    ex = Explainer(SoftModel(), layers=["act"], guided=True, adapter=ClassifierAdapter(size=8))
    return ex(X, target=weighted_sum).guided


@pytest.mark.hook("camframe_guided_rules")
def test_camframe_guided_rules_function_rule(register):
    slope = torch.sigmoid(X)  # softplus' = sigmoid > 0
    torch.testing.assert_close(guided_gradient(), slope * W)  # no rule: the plain gradient
    register(SoftplusRule())
    assert F.softplus in _plugins.guided_rules()
    torch.testing.assert_close(guided_gradient(), slope * W.clamp(min=0))  # ReLU(f'(x)) * ReLU(dL/dy)


@pytest.mark.hook("camframe_guided_rules")
def test_camframe_guided_rules_are_added_to_builtins(register):
    before = _plugins.guided_rules()
    assert F.relu in before and F.silu in before and F.softplus not in before
    register(SoftplusRule())
    after = _plugins.guided_rules()
    assert set(before) < set(after) and F.softplus in after


# --------------------------------------------------------------------------- camframe_load_model
class LoaderPlugin:
    """Takes only ``spec`` (pluggy passes just the arguments an implementation names)."""

    @camframe.hookimpl
    def camframe_load_model(self, spec):
        return Tiny() if spec == "hooks-tiny" else None


class GreedyLoader:
    """Claims ``resnet18`` before the torchvision plugin can."""

    @camframe.hookimpl(tryfirst=True)
    def camframe_load_model(self, spec, weights, device):
        return nn.Identity() if spec == "resnet18" else None


@pytest.mark.hook("camframe_load_model")
def test_camframe_load_model_first_non_none_wins(register):
    with pytest.raises(camframe.CamframeError, match="no plugin knows the model 'hooks-tiny'"):
        camframe.load_model("hooks-tiny")
    register(LoaderPlugin())
    assert isinstance(camframe.load_model("hooks-tiny"), Tiny)
    # returning None passes the spec on: camframe's own loader (asked last) takes package.module:factory
    assert isinstance(camframe.load_model("torch.nn:Identity"), nn.Identity)


@pytest.mark.hook("camframe_load_model")
def test_camframe_load_model_tryfirst(register):
    register(GreedyLoader())
    assert isinstance(camframe.load_model("resnet18", weights="random"), nn.Identity)


@pytest.mark.hook("camframe_load_model")
def test_camframe_load_model_gets_weights_and_device(register):
    seen = {}

    class Recorder:
        @camframe.hookimpl
        def camframe_load_model(self, spec, weights, device):
            if spec == "hooks-record":
                seen.update(spec=spec, weights=weights, device=device)
                return nn.Identity()
            return None

    register(Recorder())
    camframe.load_model("hooks-record", weights="w.pt", device="cpu")
    assert seen == {"spec": "hooks-record", "weights": "w.pt", "device": "cpu"}
    camframe.load_model("hooks-record")
    assert seen["weights"] is None and seen["device"] == "cpu"
