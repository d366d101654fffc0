"""camframe.testing.check_adapter: passes a sound adapter, catches broken ones with a clear message."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from camframe import ClassifierAdapter, load_image
from camframe.testing import check_adapter


class Fast(ClassifierAdapter):
    """The generic classifier adapter at 128 pixels, without the guided pass: a quick baseline."""

    name = "fast"
    guided = False

    def __init__(self) -> None:
        super().__init__(size=128)

    def layers(self, model: nn.Module) -> list[str]:
        return ["layer4"]


class WithProbe(nn.Module):
    """A classifier that also runs a side branch whose output the logits never use."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.probe = net, nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.probe(x)
        return self.net(x)


class Unreached(Fast):
    allow_unreached = True  # the engine lets this through; the kit must not

    def layers(self, model: nn.Module) -> list[str]:
        return ["net.layer4", "probe"]


class LeavesHook(Fast):
    def prepare(self, model: nn.Module) -> nn.Module:
        self.features = []
        model.layer4.register_forward_hook(lambda m, i, o: self.features.append(o))  # never removed
        return model


class Trains(Fast):
    def prepare(self, model: nn.Module) -> nn.Module:
        return model.train()  # alters the user's model


class Misplaced(Fast):
    def to_original(self, maps: torch.Tensor, meta: dict) -> torch.Tensor:
        return maps  # forgets to map back to the original image size


class Unknown(Fast):
    def layers(self, model: nn.Module) -> list[str]:
        return ["layer5"]


@pytest.fixture
def resnet18() -> nn.Module:
    """A fresh torchvision resnet18 with random weights (some adapters below damage their model)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18()


def test_resnet18_passes_and_the_cli_writes_every_file(resnet18, images, tmp_path):
    result = check_adapter(resnet18, [images["chelsea"]], spec="resnet18", weights="random", out_dir=tmp_path)
    assert len(result.targets) == 1 and result.maps.shape == (1, 224, 224)
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())["images"]
    assert set(entry["explanations"][0]["files"]) == {"cam", "map", "guided-backprop", "guided-gradcam"}


def test_arrays_and_an_adapter_instance(resnet18, images):
    result = check_adapter(resnet18, load_image(images["chelsea"]), adapter=Fast())
    assert result.maps.shape == (1, 128, 128)


@pytest.mark.parametrize("adapter, message", [
    pytest.param(Unreached(), r"default layer 'probe' gets no gradient from any of the 1 target",
                 id="unreached-layer"),
    pytest.param(LeavesHook(), r"as it came: forward/backward hooks differ at 'layer4'$",
                 id="leftover-hook"),
    pytest.param(Trains(), r"did not give back the model as it came: training flags differ at ''",
                 id="training-flag"),
    pytest.param(Misplaced(), r"target 0 a map of \(128, 128\), not the image's \(300, 451\)$",
                 id="map-size"),
    pytest.param(Unknown(), r"cannot build an Explainer with the default layers: unknown layer 'layer5'",
                 id="unknown-layer"),
])
def test_catches_a_broken_adapter(resnet18, images, adapter, message):
    model = WithProbe(resnet18) if isinstance(adapter, Unreached) else resnet18.eval()
    with pytest.raises(AssertionError, match=message):
        check_adapter(model, [images["chelsea"]], adapter=adapter)
