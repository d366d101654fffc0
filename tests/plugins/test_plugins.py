"""Plugins: discovery through entry points, precedence, failures, the ``plugins`` command."""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from torch import nn

import camframe
from camframe import CamframeError, Explainer
from camframe.plugins import builtins as _builtins
from camframe import cli as _cli
from camframe.plugins import hookspecs as _hookspecs
from camframe.plugins import manager as _plugins

PLUGIN_SOURCE = '''
"""A third-party camframe plugin, installed at test time."""
import torch
from torch import nn

import camframe
from camframe import ClassifierAdapter

__version__ = "1.2.3"


class TestplugAdapter(ClassifierAdapter):
    """Claims torchvision classifiers too (like a more specific third-party adapter would)."""

    name = "testplug"

    def matches(self, model):
        return isinstance(model, nn.Module) and type(model).__module__.startswith("torchvision.models.")

    def layers(self, model):
        return ["layer3"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


@camframe.method(gradients=False)
def channel_mean(activations, gradients=None):
    """Gradient-free: the mean over channels."""
    return activations.mean(1)


@camframe.hookimpl
def camframe_adapters():
    return [TestplugAdapter(size=32)]


@camframe.hookimpl
def camframe_methods():
    return {"testplug-mean": channel_mean}


@camframe.hookimpl
def camframe_load_model(spec, weights, device):
    if spec != "testplug-tiny":
        return None
    torch.manual_seed(0)
    return Tiny().to(device)
'''

NOHOOKS_SOURCE = '"""Registered under the camframe group by mistake: implements nothing."""\nVALUE = 1\n'

ENTRY_POINTS = {
    "testplug": "camframe_testplug",
    "testplug-broken": "camframe_testplug_missing_module",
    "testplug-nohooks": "camframe_testplug_nohooks",
}


@pytest.fixture(scope="module")
def plugin_dirs(tmp_path_factory):
    """``mods/``: the plugin modules; ``dist/``: an installed distribution's metadata
    (``camframe-testplug`` 1.2.3) declaring them as entry points of group ``camframe``."""
    root = tmp_path_factory.mktemp("plugin")
    mods, dist = root / "mods", root / "dist"
    mods.mkdir()
    (mods / "camframe_testplug.py").write_text(PLUGIN_SOURCE)
    (mods / "camframe_testplug_nohooks.py").write_text(NOHOOKS_SOURCE)
    info = dist / "camframe_testplug-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: camframe-testplug\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(
        "[camframe]\n" + "".join(f"{k} = {v}\n" for k, v in ENTRY_POINTS.items()))
    return mods, dist, info


def _install(monkeypatch, plugin_dirs, names):
    """Make the entry points ``names`` visible to camframe (a fresh manager must be in place)."""
    mods, _, info = plugin_dirs
    monkeypatch.syspath_prepend(str(mods))
    dist = importlib.metadata.PathDistribution(info)
    extra = [importlib.metadata.EntryPoint(n, ENTRY_POINTS[n], "camframe")._for(dist) for n in names]
    real = importlib.metadata.entry_points

    def entry_points(**params):
        found = list(real(**params))
        if params.get("group") == _plugins.ENTRY_POINT_GROUP:
            found += extra
        return importlib.metadata.EntryPoints(found)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


@pytest.fixture
def installed(fresh_plugins, monkeypatch, plugin_dirs):
    _install(monkeypatch, plugin_dirs, ["testplug"])
    return fresh_plugins


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(weights=None)


# --------------------------------------------------------------------------- discovery
def test_fresh_manager_sees_builtins_and_torchvision(fresh_plugins):
    names = [info["name"] for info in _plugins.plugins_info()]
    assert "camframe.builtins" in names and "torchvision" in names
    assert [a.name for a in _plugins.adapters()][-1] == "generic"


def test_plugin_installed_at_run_time(installed):
    assert installed.get_plugin("testplug") is None  # nothing loaded before first use
    info = {i["name"]: i for i in _plugins.plugins_info()}
    assert info["testplug"]["distribution"] == "camframe-testplug"
    assert info["testplug"]["version"] == "1.2.3"
    assert info["testplug"]["hooks"] == ["camframe_adapters", "camframe_load_model", "camframe_methods"]
    assert info["torchvision"]["distribution"] == "camframe-torchvision"
    assert "testplug" in [a.name for a in _plugins.adapters()]
    assert "testplug-mean" in _plugins.methods()


def test_plugin_adapter_wins_over_builtins(installed, resnet):
    order = [a.name for a in _plugins.adapters()]
    assert order.index("testplug") < order.index("torchvision") < order.index("generic")
    ex = Explainer(resnet, guided=False)
    assert ex.adapter.name == "testplug"
    assert list(ex.layers) == ["layer3"]  # the plugin's default layer, not torchvision's layer4


def test_explicit_adapter_name_wins(installed, resnet):
    ex = Explainer(resnet, adapter="torchvision", guided=False)
    assert ex.adapter.name == "torchvision" and list(ex.layers) == ["layer4"]
    ex = Explainer(resnet, adapter="generic", layers=["layer2"], guided=False)
    assert ex.adapter.name == "generic"
    with pytest.raises(CamframeError, match=r"unknown adapter 'nope'.*testplug"):
        Explainer(resnet, adapter="nope")


def test_without_the_plugin_torchvision_adapter_is_used(fresh_plugins, resnet):
    assert Explainer(resnet, guided=False).adapter.name == "torchvision"


def test_plugin_method_and_model_loader(installed):
    model = camframe.load_model("testplug-tiny")
    ex = Explainer(model, layers=["features"], method="testplug-mean", guided=False)
    assert ex.adapter.name == "generic"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = ex(x, target=1)
    with torch.no_grad():
        feats = model.features(x)
    expected = feats.mean(1).clamp(min=0)
    assert torch.count_nonzero(expected) > 0
    torch.testing.assert_close(result.layer_maps["features"], expected)
    assert result.method == "testplug-mean"


def test_unknown_method_lists_plugin_methods(installed):
    with pytest.raises(CamframeError, match=r"unknown method 'nope'.*testplug-mean"):
        Explainer(nn.Sequential(nn.Conv2d(3, 3, 1)), layers=["0"], method="nope")


@pytest.mark.parametrize("name,message", [
    ("testplug-broken", r"camframe plugin 'testplug-broken' failed to load: ModuleNotFoundError"),
    ("testplug-nohooks", r"camframe plugin 'testplug-nohooks' implements no camframe hook"),
])
def test_bad_plugin_warns_and_does_not_break(fresh_plugins, monkeypatch, plugin_dirs, resnet, name, message):
    _install(monkeypatch, plugin_dirs, [name, "testplug"])
    with pytest.warns(UserWarning, match=message):
        adapters = [a.name for a in _plugins.adapters()]
    assert adapters.index("testplug") < adapters.index("torchvision") < adapters.index("generic")
    names = [i["name"] for i in _plugins.plugins_info()]
    assert name not in names and "testplug" in names
    # and camframe works
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every use
        assert Explainer(resnet, adapter="torchvision", guided=False).adapter.name == "torchvision"


def test_plugins_command_in_process(installed, capsys):
    assert _cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("testplug "))
    assert "camframe-testplug" in line and "1.2.3" in line
    assert "camframe_adapters, camframe_load_model, camframe_methods" in line
    assert any(l.startswith("torchvision ") and "camframe-torchvision" in l for l in out.splitlines())
    assert any(l.startswith("camframe.builtins ") and camframe.__version__ in l for l in out.splitlines())
    adapters = next(l for l in out.splitlines() if l.startswith("adapters:"))
    order = [a.strip() for a in adapters.split(":", 1)[1].split(",")]
    assert order.index("testplug") < order.index("torchvision") < order.index("generic") == len(order) - 1
    methods = next(l for l in out.splitlines() if l.startswith("methods:"))
    assert "testplug-mean" in methods and "gradcam" in methods


def test_plugins_command_subprocess(plugin_dirs, tmp_path):
    """A real install (entry points found on the path) seen by ``python -m camframe plugins``."""
    mods, dist, _ = plugin_dirs
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(mods), str(dist), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "camframe", "plugins"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    line = next(l for l in lines if l.startswith("testplug "))
    assert "camframe-testplug" in line and "1.2.3" in line and "camframe_methods" in line
    assert any(l.startswith("torchvision ") and "0.1.0" in l and "camframe_load_model" in l for l in lines)
    assert any(l.startswith("camframe.builtins ") and "camframe_guided_rules" in l for l in lines)
    assert "testplug-mean" in next(l for l in lines if l.startswith("methods:"))
    # the two bad entry points are reported by name, and did not stop the command
    assert "testplug-broken" in proc.stderr and "failed to load" in proc.stderr
    assert "testplug-nohooks" in proc.stderr and "implements no camframe hook" in proc.stderr
    assert not any(l.startswith(("testplug-broken", "testplug-nohooks")) for l in lines)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("model", [object(), "resnet18", None, 3.5], ids=["object", "str", "None", "float"])
def test_model_no_adapter_matches(model):
    with pytest.raises(CamframeError, match=rf"no adapter matches a model of type {type(model).__name__}"):
        Explainer(model)


def test_unknown_model_spec():
    with pytest.raises(CamframeError, match=r"no plugin knows the model 'no_such_net'"):
        camframe.load_model("no_such_net")


# --------------------------------------------------------------------------- hook specifications
SPECS = [name for name, fn in inspect.getmembers(_hookspecs, inspect.isfunction)
         if hasattr(fn, "camframe_spec")]


def test_hookspecs_found():
    assert set(SPECS) >= {"camframe_adapters", "camframe_methods", "camframe_guided_rules", "camframe_load_model"}


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_has_one_line_docstring(name):
    doc = getattr(_hookspecs, name).__doc__
    assert doc and doc.strip(), f"{name} has no docstring"
    assert "\n" not in doc.strip(), f"{name}'s docstring is not one line"


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_implemented_by_builtins(name):
    impl = getattr(_builtins, name, None)
    assert impl is not None and hasattr(impl, "camframe_impl"), f"camframe.builtins lacks {name}"
    callers = {h.name for h in _plugins._manager().get_hookcallers(_builtins)}
    assert name in callers
