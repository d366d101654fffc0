"""The engine's contract with the user's model and its dependencies (issue 8).

Inference-mode models are refused untouched; results carry no autograd history; the user's own
forward inside ``with Explainer`` records nothing; plugins load through pluggy's public API, all
or nothing; ``hirescam`` names ``elementwise``; importing the YOLO plugin keeps stdout clean.
"""

from __future__ import annotations

import copy
import gc
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
import weakref
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

import camframe
from camframe import CamframeError, Explainer
from camframe import cli as _cli
from camframe.plugins import manager as _plugins
from camframe.evaluation.harness import configs

REPO = Path(__file__).resolve().parents[1]
X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """conv -> BatchNorm -> ReLU -> logits of 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.bn(self.conv(x))).mean((2, 3)))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def net_in_inference_mode() -> Net:
    """A model built and set up under ``torch.inference_mode()``, as some loaders do."""
    with torch.inference_mode():
        net = make_net()
    net.train()
    net.head.bias.requires_grad_(False)
    return net


def state(model: nn.Module) -> tuple:
    return ([(n, p.requires_grad, p.is_inference()) for n, p in model.named_parameters()],
            [(n, m.training) for n, m in model.named_modules()],
            [(n, len(m._forward_hooks)) for n, m in model.named_modules()])


def all_tensors(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in all_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in all_tensors(v)]
    return []


# --------------------------------------------------------------------------- inference-mode models
@pytest.mark.parametrize("layers", [["conv"], None], ids=["named-layers", "probed-layers"])
def test_inference_mode_model_is_refused_untouched(layers):
    net = net_in_inference_mode()
    before = state(net)
    with pytest.raises(CamframeError, match=r"inference_mode\(\).*'conv\.weight'.*copy\.deepcopy"):
        Explainer(net, layers=layers)(X)
    assert state(net) == before
    # the way out the message gives: a deep copy holds normal tensors
    result = Explainer(copy.deepcopy(net), layers=layers)(X, target=[1, 2])
    assert result.maps.shape == (4, 16, 16) and bool((result.maps.amax((1, 2)) > 0).all())
    assert state(net) == before


def _cli_model(tmp_path: Path, monkeypatch, name: str, body: str) -> None:
    """A module ``name`` on the path whose ``build()`` has ``body``, ``{net}`` standing for a tiny classifier."""
    net = "nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))"
    (tmp_path / f"{name}.py").write_text("import torch\nfrom torch import nn\n\n\ndef build():\n" + body.format(net=net))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_inference_mode_model_refused_by_the_cli(tmp_path, monkeypatch, capsys):
    _cli_model(tmp_path, monkeypatch, "h5_infmodel", "    with torch.inference_mode():\n        return {net}\n")
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    code = _cli.main(["explain", str(tmp_path / "a.png"), "--model", "h5_infmodel:build", "--layers", "1",
                      "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("camframe: error: the model was built under torch.inference_mode()")
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".camframe"}


# --------------------------------------------------------------------------- results are detached
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_result_tensors_carry_no_autograd_history(fresh_plugins, guided):
    """Even when the input requires grad and a method's output does (as ``materialize_grads``'
    zeros did on older torch), nothing in the Result holds a graph."""
    scale = torch.ones((), requires_grad=True)

    @camframe.method()
    def scaled(activations: Tensor, gradients: Tensor) -> Tensor:
        return (activations * gradients).sum(1) * scale

    class Plugin:
        @camframe.hookimpl
        def camframe_methods(self):
            return {"h5-scaled": scaled}

    fresh_plugins.register(Plugin(), name="h5-scaled")
    x = X.clone().requires_grad_()
    result = Explainer(make_net(), layers=["conv", "act"], method="h5-scaled", guided=guided)(x, target=[0, 3])
    tensors = [t for f in fields(result) for t in all_tensors(getattr(result, f.name))]
    assert len(tensors) >= 6 + 2 * guided  # maps, inputs, 2 layer maps, 2 reached (+ guided)
    assert [t for t in tensors if t.requires_grad or t.grad_fn is not None] == []
    assert result.maps.shape == (4, 16, 16)


# --------------------------------------------------------------------------- capture only while explaining
def test_user_forward_inside_with_records_nothing():
    net = make_net()
    seen: list[weakref.ref] = []
    net.conv.register_forward_hook(lambda m, i, o: seen.append(weakref.ref(o)))  # runs before camframe's
    with Explainer(net, layers=["conv"]) as ex:
        expected = ex(X, target=[1])
        seen.clear()
        out = net(X.clone().requires_grad_())  # the user's own forward, with a graph
        assert out.shape == (2, 4)
        del out
        gc.collect()
        assert len(seen) == 1 and seen[0]() is None, "the user's activation is kept alive by camframe"
        again = ex(X, target=[1])
    torch.testing.assert_close(again.maps, expected.maps)


# --------------------------------------------------------------------------- plugin loading
PLUGIN = '''
import camframe


@camframe.method(gradients=False)
def channel_max(activations, gradients=None):
    return activations.amax(1)


@camframe.hookimpl
def camframe_methods():
    return {"{name}": channel_max}
'''


@pytest.fixture
def entry_points(tmp_path, monkeypatch):
    """Install plugin modules ``h5_plug_<name>`` (each a method ``<name>``) as entry points of distribution camframe-h5 4.5.6;
    only they are seen. ``install(names, interrupt=...)`` also adds one whose first load is cut
    short by Ctrl-C."""
    info = tmp_path / "camframe_h5-4.5.6.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: camframe-h5\nVersion: 4.5.6\n")
    dist = importlib.metadata.PathDistribution(info)
    monkeypatch.syspath_prepend(str(tmp_path))

    class Interrupted(importlib.metadata.EntryPoint):
        calls: list[int] = []

        def load(self):
            self.calls.append(1)
            if len(self.calls) == 1:
                raise KeyboardInterrupt
            return super().load()

    def install(names: list[str], interrupt: str | None = None) -> None:
        eps = []
        for name in [*names, *([interrupt] if interrupt else [])]:
            module = f"h5_plug_{name.replace('-', '_')}"
            (tmp_path / f"{module}.py").write_text(PLUGIN.replace("{name}", name))
            kind = Interrupted if name == interrupt else importlib.metadata.EntryPoint
            eps.append(kind(name, module, _plugins.ENTRY_POINT_GROUP)._for(dist))
        monkeypatch.setattr(importlib.metadata, "entry_points",
                            lambda **params: importlib.metadata.EntryPoints(eps))

    return install


def test_plugin_distribution_shown_without_pluggy_private_api(fresh_plugins, entry_points, capsys):
    """pluggy's main branch has no ``_plugin_distinfo``; camframe must not need it."""
    del fresh_plugins._plugin_distinfo
    entry_points(["h5-one"])
    info = {i["name"]: i for i in _plugins.plugins_info()}
    assert info["h5-one"]["distribution"] == "camframe-h5" and info["h5-one"]["version"] == "4.5.6"
    assert info["camframe.builtins"]["version"] == camframe.__version__
    assert _cli.main(["plugins"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("h5-one "))
    assert "camframe-h5 4.5.6" in line and "camframe_methods" in line


def test_interrupted_loading_leaves_nothing_half_loaded(fresh_plugins, entry_points):
    entry_points(["h5-first"], interrupt="h5-slow")
    with pytest.raises(KeyboardInterrupt):
        _plugins.methods()
    assert fresh_plugins.get_plugins() == set() and _plugins._loaded is False
    found = _plugins.methods()  # the next use loads everything
    assert {"h5-first", "h5-slow", "elementwise"} <= set(found)
    assert {i["name"]: i["version"] for i in _plugins.plugins_info()}["h5-slow"] == "4.5.6"


# --------------------------------------------------------------------------- hirescam
def test_hirescam_is_elementwise():
    net = make_net()
    hires = Explainer(net, layers=["conv"], method="hirescam")(X, target=[2])
    plain = Explainer(net, layers=["conv"], method="elementwise")(X, target=[2])
    assert hires.method == "elementwise"
    torch.testing.assert_close(hires.maps, plain.maps)
    assert [c.method for c in configs(["hirescam", "gradcam", "elementwise"], ["default"], ["max"])] == \
        ["elementwise", "gradcam"]
    with pytest.raises(CamframeError, match=r"unknown method 'hirescamm'.*elementwise \(alias: hirescam\)"):
        Explainer(net, layers=["conv"], method="hirescamm")


def test_hirescam_in_the_cli(tmp_path, monkeypatch, capsys):
    _cli_model(tmp_path, monkeypatch, "h5_model", "    torch.manual_seed(0)\n    return {net}\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert _cli.main(["explain", str(tmp_path / "a.png"), "--model", "h5_model:build", "--layers", "0",
                      "--method", "hirescam", "--no-guided", "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "elementwise"
    capsys.readouterr()
    assert _cli.main(["plugins"]) == 0
    methods = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("methods:"))
    assert "elementwise (alias: hirescam)" in methods


# --------------------------------------------------------------------------- YOLO plugin
LAYER_LINE = re.compile(r"^[* ] \S+\s+\S+\s+\([\d, ]+\)$")


@pytest.mark.needs_plugins
def test_yolo_plugin_keeps_stdout_clean_on_a_fresh_home(tmp_path):
    """Ultralytics prints a settings banner on its first run; it must not reach camframe's stdout."""
    env = {**os.environ, "HOME": str(tmp_path), "YOLO_CONFIG_DIR": str(tmp_path)}

    def run(*args: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "camframe", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    lines = run("plugins")
    assert lines[-2].startswith("adapters:") and lines[-1].startswith("methods:")
    assert all(re.match(r"^\S+\s+\S+ \S+\s+hooks: camframe_", l) for l in lines[:-2]), lines
    assert any(l.startswith("ultralytics ") for l in lines)
    lines = run("layers", "--model", "yolov8n.yaml")
    assert lines[-1].startswith("* default layers of adapter 'ultralytics'")
    presets = [l for l in lines[:-1] if l.startswith("preset ")]
    assert [p.split(":")[0] for p in presets] == ["preset head-inputs", "preset neck", "preset backbone"]
    layers = [l for l in lines[:-1] if l not in presets]
    assert all(LAYER_LINE.match(l) for l in layers), [l for l in layers if not LAYER_LINE.match(l)]


# --------------------------------------------------------------------------- declared minima
def test_lowest_job_installs_the_declared_minima():
    """``make test-lowest`` pins every core dependency at the minimum pyproject.toml declares."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = dict(re.fullmatch(r"([\w-]+)>=([\d.]+)", d).groups() for d in deps)
    line = re.search(r"^LOWEST_PINS := (.+)$", (REPO / "Makefile").read_text(), flags=re.M)
    assert line, "the Makefile has no LOWEST_PINS"
    pins = dict(pin.split("==") for pin in line.group(1).split())
    assert pins.keys() == declared.keys()
    for name, minimum in declared.items():
        assert pins[name].split(".")[:len(minimum.split("."))] == minimum.split("."), (name, pins[name], minimum)
    assert "make test-lowest" in (REPO / ".ci/run").read_text()
