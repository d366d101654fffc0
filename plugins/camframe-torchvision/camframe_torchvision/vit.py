"""Vision transformers (ViT, DeiT, Swin) from torchvision and timm: their token outputs as
``(B, C, h, w)`` feature maps, and pytorch-grad-cam's recommended layer as the default.

A ViT block gives ``(B, prefix + h*w, C)`` tokens: the prefix (class token; DeiT's distillation
token; register tokens) is dropped and the patch tokens laid out on the patch grid. Swin's stages
are channels-last ``(B, h, w, C)``: permuted to channels-first.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torchvision
from torch import Tensor, nn
from torchvision.models import SwinTransformer, VisionTransformer

from camframe import CamframeError, ClassifierAdapter

from . import TorchvisionAdapter


def _channels_first(layer: str) -> bool:
    return False


@dataclass(frozen=True)
class TokenLayout:
    """Where a transformer keeps its patches: ``prefix`` tokens before a ``grid`` (h, w) of patch
    tokens in ``(B, tokens, C)`` outputs (ViT), and which layers are channels-last (Swin)."""

    prefix: int = 0
    grid: tuple[int, int] | None = None
    channels_last: Callable[[str], bool] = _channels_first

    def feature_map(self, layer: str, tensor: Tensor) -> Tensor:
        """``tensor`` (an output of ``layer`` or the gradient at it) as ``(B, C, h, w)``."""
        if self.grid is not None and tensor.ndim == 3:
            tokens = tensor[:, self.prefix:]
            h, w = self.grid
            if tokens.shape[1] != h * w:
                raise CamframeError(f"layer {layer!r}: {tokens.shape[1]} patch tokens do not fill the "
                                    f"{h}x{w} patch grid")
            return tokens.reshape(len(tokens), h, w, tokens.shape[2]).permute(0, 3, 1, 2)
        if tensor.ndim == 4 and self.channels_last(layer):
            return tensor.permute(0, 3, 1, 2)
        return tensor


class _TokenMaps:
    """Adapter mixin: ``prepare`` sets ``layout``; ``feature_map`` applies it."""

    layout = TokenLayout()

    def feature_map(self, layer: str, tensor: Tensor) -> Tensor:
        return self.layout.feature_map(layer, tensor)


def _torchvision_swin_nhwc(layer: str) -> bool:
    """torchvision Swin: everything in ``features`` after the patch convolution, and ``norm``."""
    return layer == "norm" or (layer.split(".")[0] == "features" and layer != "features.0.0")


class TorchvisionTransformer(_TokenMaps, TorchvisionAdapter):
    """torchvision's ``vit_*``, ``swin_*`` and ``swin_v2_*`` classifiers.

    Default layer (pytorch-grad-cam's recommendation): the last encoder block's first LayerNorm
    (ViT), the last stage's last block's ``norm1`` (Swin).
    """

    name = "torchvision-transformer"
    priority = -5  # before the torchvision adapter, which matches these models too

    def matches(self, model: Any) -> bool:
        return isinstance(model, (VisionTransformer, SwinTransformer))

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        if isinstance(model, VisionTransformer):
            self.size = model.image_size  # the model only takes its own size
            side = model.image_size // model.patch_size
            self.layout = TokenLayout(prefix=1, grid=(side, side))
        else:
            self.layout = TokenLayout(channels_last=_torchvision_swin_nhwc)
        return model

    def layers(self, model: nn.Module) -> list[str]:
        if isinstance(model, VisionTransformer):
            last = list(model.encoder.layers.named_children())[-1][0]
            return [f"encoder.layers.{last}.ln_1"]
        return [f"features.{len(model.features) - 1}.{len(model.features[-1]) - 1}.norm1"]


def _timm_swin_nhwc(layer: str) -> bool:
    """timm Swin: the patch embedding after its convolution, the stages and ``norm``."""
    top = layer.split(".")[0]
    return layer == "norm" or top == "layers" or (top == "patch_embed" and layer != "patch_embed.proj")


def _timm_family(model: Any) -> str | None:
    """``"vit"`` (ViT, DeiT), ``"swin"`` (Swin v1 and v2) or None, for a timm model."""
    if not type(model).__module__.startswith("timm.models."):
        return None
    from timm.models.swin_transformer import SwinTransformer as TimmSwin
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if isinstance(model, TimmViT):
        return "vit"
    return "swin" if isinstance(model, (TimmSwin, TimmSwinV2)) else None


class TimmTransformer(_TokenMaps, ClassifierAdapter):
    """timm's ViT, DeiT (also distilled) and Swin classifiers: input size and normalisation from
    the model's ``pretrained_cfg``; ImageNet class names for 1000-class models.

    Default layer (pytorch-grad-cam's recommendation): ``blocks[-1].norm1`` (ViT, DeiT),
    ``layers[-1].blocks[-1].norm1`` (Swin).
    """

    name = "timm"
    priority = -10

    def matches(self, model: Any) -> bool:
        return _timm_family(model) is not None

    def prepare(self, model: nn.Module) -> nn.Module:
        cfg = model.pretrained_cfg
        self.size = int(cfg["input_size"][-1])
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.categories = _imagenet_categories() if model.num_classes == 1000 else None
        if _timm_family(model) == "vit":
            self.layout = TokenLayout(prefix=model.num_prefix_tokens, grid=tuple(model.patch_embed.grid_size))
        else:
            self.layout = TokenLayout(channels_last=_timm_swin_nhwc)
        return model

    def layers(self, model: nn.Module) -> list[str]:
        if _timm_family(model) == "vit":
            return [f"blocks.{len(model.blocks) - 1}.norm1"]
        return [f"layers.{len(model.layers) - 1}.blocks.{len(model.layers[-1].blocks) - 1}.norm1"]


def _imagenet_categories() -> list[str]:
    return list(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"])


def load_timm(spec: str, weights: str | None, device: str) -> nn.Module:
    """The timm model ``timm:NAME``, with random weights or those of ``weights`` (a file; timm's
    own downloads are not used)."""
    name = spec.removeprefix("timm:")
    try:
        import timm
    except ImportError:
        raise CamframeError("timm models need timm: pip install 'camframe-torchvision[timm]'") from None
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise CamframeError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if weights is None:
        raise CamframeError(f"{name}: pass --weights FILE, or --weights random")
    model = timm.create_model(name, pretrained=False)
    if weights != "random":
        from camframe.adapters import load_weights

        model = load_weights(model, weights, name)
    return model.to(device)
