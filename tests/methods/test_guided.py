"""Guided backpropagation: an activation ``y = f(x)`` passes back ``ReLU(f'(x)) * ReLU(dL/dy)``.

Each test builds a model ``Identity -> activation``, explains the score ``sum(W * y)`` (so the
gradient arriving at the activation is ``W``, of both signs) with ``guided=True`` and compares
``result.guided`` (the input gradient) with ``ReLU(f'(x)) * ReLU(W)`` worked out by hand from the
activation's analytic derivative.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camframe
from camframe import Explainer
from camframe.plugins import manager as _plugins
from camframe.methods.guided import guided as guided_mode

SHAPE = (2, 3, 6, 6)
GEN = torch.Generator().manual_seed(0)
X = torch.randn(SHAPE, generator=GEN) * 3  # covers every piece of relu6 / hardswish / hardtanh
W = torch.randn(SHAPE[1:], generator=GEN)  # dL/dy, both signs


# --------------------------------------------------------------------------- analytic derivatives
def d_relu(x):
    return (x > 0).float()


def d_relu6(x):
    return ((x > 0) & (x < 6)).float()


def d_hardtanh(x):
    return ((x > -1) & (x < 1)).float()


def d_leaky(slope):
    return lambda x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))


def d_elu(x):
    return torch.where(x > 0, torch.ones_like(x), torch.exp(x))


def d_silu(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def d_gelu(x):
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def d_hardswish(x):
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), (2 * x + 3) / 6))


def d_mish(x):
    t = torch.tanh(F.softplus(x))
    return t + x * (1 - t * t) * torch.sigmoid(x)


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


MODULES = {
    "ReLU": (lambda: nn.ReLU(), d_relu),
    "ReLU(inplace)": (lambda: nn.ReLU(inplace=True), d_relu),
    "ReLU6": (lambda: nn.ReLU6(), d_relu6),
    "ReLU6(inplace)": (lambda: nn.ReLU6(inplace=True), d_relu6),
    "Hardtanh": (lambda: nn.Hardtanh(), d_hardtanh),
    "LeakyReLU": (lambda: nn.LeakyReLU(), d_leaky(0.01)),
    "LeakyReLU(0.2,inplace)": (lambda: nn.LeakyReLU(0.2, inplace=True), d_leaky(0.2)),
    "ELU": (lambda: nn.ELU(), d_elu),
    "ELU(inplace)": (lambda: nn.ELU(inplace=True), d_elu),
    "SiLU": (lambda: nn.SiLU(), d_silu),
    "SiLU(inplace)": (lambda: nn.SiLU(inplace=True), d_silu),
    "GELU": (lambda: nn.GELU(), d_gelu),
    "Hardswish": (lambda: nn.Hardswish(), d_hardswish),
    "Hardswish(inplace)": (lambda: nn.Hardswish(inplace=True), d_hardswish),
    "Mish": (lambda: nn.Mish(), d_mish),
    "Mish(inplace)": (lambda: nn.Mish(inplace=True), d_mish),
}

FUNCTIONS = {
    "F.relu": (lambda x: F.relu(x), d_relu),
    "torch.relu": (lambda x: torch.relu(x), d_relu),
    "Tensor.relu": (lambda x: x.relu(), d_relu),
    "Tensor.relu_": (lambda x: x.relu_(), d_relu),
    "torch.relu_": (lambda x: torch.relu_(x), d_relu),
    "F.relu_": (lambda x: F.relu_(x), d_relu),
    "F.relu(inplace)": (lambda x: F.relu(x, inplace=True), d_relu),
    "F.relu6": (lambda x: F.relu6(x), d_relu6),
    "F.relu6(inplace)": (lambda x: F.relu6(x, inplace=True), d_relu6),
    "F.hardtanh": (lambda x: F.hardtanh(x), d_hardtanh),
    "F.hardtanh_": (lambda x: F.hardtanh_(x), d_hardtanh),
    "F.leaky_relu": (lambda x: F.leaky_relu(x, 0.1), d_leaky(0.1)),
    "F.leaky_relu_": (lambda x: F.leaky_relu_(x, 0.1), d_leaky(0.1)),
    "F.elu": (lambda x: F.elu(x), d_elu),
    "F.elu_": (lambda x: F.elu_(x), d_elu),
    "F.silu": (lambda x: F.silu(x), d_silu),
    "F.silu(inplace)": (lambda x: F.silu(x, inplace=True), d_silu),
    "F.gelu": (lambda x: F.gelu(x), d_gelu),
    "F.hardswish": (lambda x: F.hardswish(x), d_hardswish),
    "F.hardswish(inplace)": (lambda x: F.hardswish(x, inplace=True), d_hardswish),
    "F.mish": (lambda x: F.mish(x), d_mish),
    "F.mish(inplace)": (lambda x: F.mish(x, inplace=True), d_mish),
}


def one_activation(act: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict(pre=nn.Identity(), act=act))


def score(out: torch.Tensor) -> torch.Tensor:
    return (out * W).flatten(1).sum(1)


def guided_input_gradient(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    result = Explainer(model, layers=["pre"], guided=True)(x.clone(), target=score)
    assert result.guided is not None and result.guided.shape == x.shape
    return result.guided


def expected(derivative, x: torch.Tensor = X) -> torch.Tensor:
    return derivative(x).clamp(min=0) * W.clamp(min=0)


def test_derivatives_are_right():
    """The hand derivatives agree with autograd (so the tests below check the rule, not typos)."""
    for name, (make, derivative) in MODULES.items():
        x = X.clone().requires_grad_()
        (g,) = torch.autograd.grad(make()(x * 1).sum(), x)
        torch.testing.assert_close(g, derivative(X), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", list(MODULES))
def test_activation_module(name):
    make, derivative = MODULES[name]
    got = guided_input_gradient(one_activation(make()))
    want = expected(derivative)
    assert torch.count_nonzero(want) > 0 and bool((want == 0).any())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_activation_function(name):
    fn, derivative = FUNCTIONS[name]
    got = guided_input_gradient(one_activation(Fn(fn)))
    torch.testing.assert_close(got, expected(derivative), atol=1e-6, rtol=1e-5)


# The same in-place activations, written the way much model code writes them: the result of the
# in-place call is not used, the tensor itself is (``x.relu_(); return x``).
def _relu_method_(x):
    x.relu_()
    return x


def _torch_relu_(x):
    torch.relu_(x)
    return x


def _f_relu_inplace(x):
    F.relu(x, inplace=True)
    return x


def _f_silu_inplace(x):
    F.silu(x, inplace=True)
    return x


IGNORED_RESULT = {
    "x.relu_()": (_relu_method_, d_relu),
    "torch.relu_(x)": (_torch_relu_, d_relu),
    "F.relu(x,inplace=True)": (_f_relu_inplace, d_relu),
    "F.silu(x,inplace=True)": (_f_silu_inplace, d_silu),
}


@pytest.mark.parametrize("name", list(IGNORED_RESULT))
def test_inplace_activation_with_unused_result(name):
    fn, derivative = IGNORED_RESULT[name]
    model = one_activation(Fn(fn))
    # the guided pass must compute the same forward values as the model itself
    with torch.no_grad():
        plain = model(X.clone())
    with guided_mode(model, _plugins.guided_rules()):
        traced = model(X.clone().requires_grad_() * 1)
    torch.testing.assert_close(traced.detach(), plain, msg="the guided pass changed the forward values")
    torch.testing.assert_close(guided_input_gradient(model), expected(derivative), atol=1e-6, rtol=1e-5)


def test_guided_forward_values_unchanged():
    """Inside the guided pass every built-in activation computes exactly what it computes outside."""
    x = X.clone()
    for name, (make, _) in {**MODULES, **{k: (lambda fn=fn: Fn(fn), d) for k, (fn, d) in FUNCTIONS.items()}}.items():
        model = one_activation(make())
        with torch.no_grad():
            plain = model(x.clone())
        with guided_mode(model, _plugins.guided_rules()):
            traced = model(x.clone().requires_grad_() * 1)
        torch.testing.assert_close(traced.detach(), plain, msg=name)


def test_rule_composes_through_layers():
    """conv -> ReLU -> conv -> SiLU, backpropagated by hand with the rule at each activation."""
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(OrderedDict(pre=nn.Identity(), conv1=conv1, relu=nn.ReLU(inplace=True),
                                      conv2=conv2, silu=nn.SiLU()))
    got = guided_input_gradient(model)
    with torch.enable_grad():
        x = X.clone().requires_grad_()
        z1 = conv1(x)
        a1 = z1.detach().clamp(min=0).requires_grad_()
        z2 = conv2(a1)
        g_z2 = d_silu(z2.detach()).clamp(min=0) * W.clamp(min=0)
        (g_a1,) = torch.autograd.grad(z2, a1, g_z2)
        g_z1 = d_relu(z1.detach()) * g_a1.clamp(min=0)
        (g_x,) = torch.autograd.grad(z1, x, g_z1)
    assert torch.count_nonzero(g_x) > 0
    torch.testing.assert_close(got, g_x, atol=1e-6, rtol=1e-5)


def test_guided_uses_the_unmodified_input():
    """A model whose first op is in place (it changes its input) gets the same guided gradients as
    the same model written out of place: the guided pass must start from the original input."""
    def make(inplace):
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(act0=nn.SiLU(inplace=inplace), pre=nn.Conv2d(3, 3, 3, padding=1),
                                         act=nn.SiLU()))
    a = Explainer(make(False), layers=["pre"], guided=True)(X.clone(), target=score)
    b = Explainer(make(True), layers=["pre"], guided=True)(X.clone(), target=score)
    torch.testing.assert_close(b.maps, a.maps)
    torch.testing.assert_close(b.guided, a.guided, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- custom activations
class Swish15(nn.Module):
    """A user's own activation: x * sigmoid(1.5 x), built from ops no guided rule knows."""

    def forward(self, x):
        return x * torch.sigmoid(1.5 * x)


class InplaceSwish(nn.Module):
    """The same, in place (as several model zoos write swish to save memory)."""

    def forward(self, x):
        return x.mul_(torch.sigmoid(1.5 * x))


def d_swish15(x):
    s = torch.sigmoid(1.5 * x)
    return s + 1.5 * x * s * (1 - s)


class CustomRules:
    @camframe.hookimpl
    def camframe_guided_rules(self):
        return [Swish15, InplaceSwish]


@pytest.fixture
def custom_rules():
    pm = _plugins._manager()
    plugin = CustomRules()
    pm.register(plugin, name="test-guided-custom-rules")
    try:
        yield
    finally:
        pm.unregister(plugin)


def test_custom_activation_not_guided_without_rule():
    assert Swish15 not in _plugins.guided_rules()
    got = guided_input_gradient(one_activation(Swish15()))
    torch.testing.assert_close(got, d_swish15(X) * W, atol=1e-6, rtol=1e-5)  # plain gradient


def test_custom_activation_guided_via_plugin(custom_rules):
    assert Swish15 in _plugins.guided_rules()
    got = guided_input_gradient(one_activation(Swish15()))
    want = expected(d_swish15)
    assert not torch.allclose(want, d_swish15(X) * W)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_custom_rule_gone_after_unregister():
    pm = _plugins._manager()
    plugin = CustomRules()
    pm.register(plugin, name="test-guided-custom-rules")
    pm.unregister(plugin)
    assert Swish15 not in _plugins.guided_rules()
    got = guided_input_gradient(one_activation(Swish15()))
    torch.testing.assert_close(got, d_swish15(X) * W, atol=1e-6, rtol=1e-5)


def test_custom_inplace_activation_guided_via_plugin(custom_rules):
    got = guided_input_gradient(one_activation(InplaceSwish()))
    torch.testing.assert_close(got, expected(d_swish15), atol=1e-6, rtol=1e-5)


def test_custom_activation_inside_a_network(custom_rules):
    """Hook-based rules also apply deep inside a network, to every instance of the type."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(OrderedDict(pre=nn.Identity(), s1=Swish15(), conv=conv, s2=Swish15()))
    got = guided_input_gradient(model)
    with torch.enable_grad():
        a1 = (X * torch.sigmoid(1.5 * X)).requires_grad_()
        z = conv(a1)
        (g_a1,) = torch.autograd.grad(z, a1, d_swish15(z.detach()).clamp(min=0) * W.clamp(min=0))
    torch.testing.assert_close(got, d_swish15(X).clamp(min=0) * g_a1.clamp(min=0), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- batching
class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.c1(x))
        x = F.gelu(self.c2(x))
        x = nn.functional.hardswish(self.c3(x)) + F.leaky_relu(x, 0.05)
        return self.fc(F.silu(x).mean((2, 3)))


@pytest.fixture(scope="module")
def small_batch():
    torch.manual_seed(0)
    return SmallNet(), torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def test_guided_batched_equals_single_images(small_batch):
    model, x = small_batch
    batch = Explainer(model, layers=["c3"], guided=True)(x, target=[0, 2])
    assert [(t.image, t.class_id) for t in batch.targets] == [(b, c) for b in range(3) for c in (0, 2)]
    for u, t in enumerate(batch.targets):
        single = Explainer(model, layers=["c3"], guided=True)(x[t.image:t.image + 1], target=t.class_id)
        assert torch.count_nonzero(single.guided) > 0
        torch.testing.assert_close(batch.guided[u], single.guided[0], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(batch.maps[u], single.maps[0], atol=1e-6, rtol=1e-5)
    # two classes of one image get different guided gradients
    assert not torch.allclose(batch.guided[0], batch.guided[1])


def test_guided_grad_batch_equals_sequential(small_batch):
    model, x = small_batch
    one = Explainer(model, layers=["c3"], guided=True, grad_batch=1)(x, target=[0, 1, 3])
    many = Explainer(model, layers=["c3"], guided=True, grad_batch=3)(x, target=[0, 1, 3])
    torch.testing.assert_close(many.guided, one.guided, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(many.maps, one.maps, atol=1e-6, rtol=1e-5)


def test_one_forward_serves_maps_and_guided(small_batch):
    """Maps and guided backprop share one forward run in guided mode: the maps' gradients are the
    true ones (activations lie between ``c1`` and the score), the input's follow the guided rule
    exactly as a forward and backward of their own do."""
    model, x = small_batch
    calls = []
    handle = model.c1.register_forward_hook(lambda *_: calls.append(1))
    try:
        both = Explainer(model, layers=["c1", "c3"], guided=True)(x, target=[0, 2])
    finally:
        handle.remove()
    assert len(calls) == 1
    plain = Explainer(model, layers=["c1", "c3"], guided=False)(x, target=[0, 2])
    torch.testing.assert_close(both.maps, plain.maps, atol=1e-6, rtol=1e-5)
    for name in plain.layer_maps:
        torch.testing.assert_close(both.layer_maps[name], plain.layer_maps[name], atol=1e-6, rtol=1e-5)
    frozen = [p.requires_grad_(False) for p in model.parameters()]
    try:
        for u, t in enumerate(both.targets):
            xg = x[t.image:t.image + 1].clone().requires_grad_()
            with guided_mode(model, _plugins.guided_rules()):
                (expected,) = torch.autograd.grad(model(xg)[0, t.class_id], xg)
            torch.testing.assert_close(both.guided[u], expected[0], atol=1e-7, rtol=1e-5)
    finally:
        for p in frozen:
            p.requires_grad_(True)
