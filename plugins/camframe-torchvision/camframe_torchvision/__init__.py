"""camframe plugin: torchvision's image classifiers (default layers, preprocessing, class names) and
detectors (``detection``)."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import camframe
from camframe import CamframeError, ClassifierAdapter

from .detection import TorchvisionDetector

__version__ = "0.1.0"

# Families whose last feature map is not ``features[-1]``.
_LAYERS = {
    "ResNet": "layer4",
    "RegNet": "trunk_output",
    "ShuffleNetV2": "conv5",
    "GoogLeNet": "inception5b",
    "Inception3": "Mixed_7c",
    "DenseNet": "features",
    "SqueezeNet": "features",
}


def _weights_enum(name: str) -> Any:
    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


# The builder name of each model ``camframe_load_model`` built (the model itself carries no tag).
_BUILT: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _arch(model: nn.Module) -> str:
    """The torchvision builder name: the one ``load`` built it with, else guessed from the class name."""
    arch = _BUILT.get(model)
    if arch is None:
        flat = type(model).__name__.lower()
        arch = next((n for n in torchvision.models.list_models(module=torchvision.models)
                     if n.replace("_", "") == flat), flat)
    return arch


class TorchvisionAdapter(ClassifierAdapter):
    """torchvision classification models: class names and normalisation from the weights' meta."""

    name = "torchvision"
    priority = -10

    def matches(self, model: Any) -> bool:
        return isinstance(model, nn.Module) and type(model).__module__.startswith("torchvision.models.") \
            and ".detection." not in type(model).__module__ and ".segmentation." not in type(model).__module__

    def prepare(self, model: nn.Module) -> nn.Module:
        weights = _weights_enum(_arch(model)) or torchvision.models.ResNet50_Weights
        default = weights.DEFAULT
        transform = default.transforms()
        self.size = transform.crop_size[0]
        self.mean, self.std = tuple(transform.mean), tuple(transform.std)
        self.categories = list(default.meta["categories"])
        return model

    def layers(self, model: nn.Module) -> list[str]:
        family = type(model).__name__
        if family in _LAYERS:
            return [_LAYERS[family]]
        features = getattr(model, "features", None)
        if isinstance(features, nn.Sequential):
            return [f"features.{len(features) - 1}"]
        return super().layers(model)


def load(spec: str, weights: str | None, device: str) -> tuple[nn.Module, str] | None:
    """The model that ``NAME`` or ``torchvision:NAME`` names, and its builder name; weights from
    ``--weights FILE`` or torch's local hub cache."""
    name = spec.removeprefix("torchvision:")
    detector = name in torchvision.models.list_models(module=torchvision.models.detection)
    if not detector and name not in torchvision.models.list_models(module=torchvision.models):
        if spec.startswith("torchvision:"):
            raise CamframeError(f"unknown torchvision classifier {name!r}")
        return None
    # offline: a detector's backbone gets no pretrained weights of its own either
    model = torchvision.models.get_model(name, weights=None, **({"weights_backbone": None} if detector else {}))
    if weights == "random":
        if isinstance(model, torchvision.models.VisionTransformer):  # its head starts at zero: no gradient
            nn.init.trunc_normal_(model.heads.head.weight, std=0.02)
        return model.to(device), name
    if weights is None:
        enum = _weights_enum(name)
        url = enum.DEFAULT.url if enum is not None else None
        cached = Path(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1]) if url else None
        if cached is None or not cached.is_file():
            raise CamframeError(f"{name}: pretrained weights need a download ({url}); "
                                "pass --weights FILE, or --weights random")
        weights = str(cached)
    from camframe.adapters import load_weights

    return load_weights(model, weights, name).to(device), name


@camframe.hookimpl
def camframe_adapters() -> list[camframe.Adapter]:
    from .vit import TimmTransformer, TorchvisionTransformer  # they build on TorchvisionAdapter

    return [TorchvisionAdapter(), TorchvisionDetector(), TorchvisionTransformer(), TimmTransformer()]


@camframe.hookimpl
def camframe_load_model(spec: str, weights: str | None, device: str) -> nn.Module | None:
    if spec.startswith("timm:"):
        from .vit import load_timm

        return load_timm(spec, weights, device)
    loaded = load(spec, weights, device)
    if loaded is None:
        return None
    model, name = loaded
    _BUILT[model] = name
    return model
