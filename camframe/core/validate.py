"""One validation layer for the CLI and the Python API: each check, and its message, lives here once.

Every function either returns the value in its checked (normalised) form or raises
``CamframeError`` with a one-line message.
"""

from __future__ import annotations

import numbers
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from camframe.core.errors import CamframeError

if TYPE_CHECKING:
    from camframe.adapters.base import Adapter

__all__ = ["device", "adapter_fits", "option_values", "class_item", "class_ids", "scores", "image_list", "rgb_array",
           "tensor_batch", "input_channels"]

_DEVICE = re.compile(r"(cpu|mps|cuda(?::(\d+))?)")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def device(name: str) -> str:
    """``name`` if it is ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` and that device exists here; ``auto`` is
    ``cuda`` if there is a CUDA GPU, else ``mps`` if there is one, else ``cpu``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    match = _DEVICE.fullmatch(str(name))
    if match is None:
        raise CamframeError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CamframeError("device 'mps' is not available on this machine")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CamframeError(f"device {name!r} is not available: no CUDA GPU found")
        if match.group(2) is not None and int(match.group(2)) >= count:
            raise CamframeError(f"device {name!r} does not exist: {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    return name


def adapter_fits(adapter: Adapter, model: Any) -> Adapter:
    """``adapter`` (one the user named) if it ``matches(model)``."""
    if not adapter.matches(model):
        raise CamframeError(f"adapter {adapter.name!r} does not fit a model of type {type(model).__name__}; "
                            "leave the adapter out to pick one that does")
    return adapter


def option_values(adapter: Adapter, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with each value checked against (and converted to) its declared type: the
    adapter's ``option_types`` entry, else the type of its default. Text (from the command
    line) is parsed to that type; an option with neither stays as given (text guessed)."""
    return {key: _option(adapter, key, value) for key, value in options.items()}


def _option(adapter: Adapter, key: str, value: Any) -> Any:
    default = adapter.defaults.get(key)
    kind = adapter.option_types.get(key) or (type(default) if default is not None else None)
    if default is None and (value is None or isinstance(value, str) and value.lower() == "none"):
        return None
    if kind is None:
        return _guess(value) if isinstance(value, str) else value
    converted = _convert(value, kind)
    if converted is None:
        raise CamframeError(f"adapter {adapter.name!r}: option {key} must be {kind.__name__}, got {value!r}")
    return converted


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (int, float, bool, str, or any other type by isinstance), or None."""
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            return None
    if isinstance(value, str) and kind is bool:
        return _BOOLS.get(value.lower())
    if kind in (int, float) and isinstance(value, (bool, np.bool_)):
        return None
    if kind is float and isinstance(value, numbers.Real):
        return float(value)
    if kind is int and isinstance(value, numbers.Integral):
        return int(value)
    if kind is bool and isinstance(value, (bool, np.bool_)):
        return bool(value)
    return value if isinstance(value, kind) else None


def _guess(text: str) -> Any:
    """A command-line value of an untyped option: true/false/none, an int, a float, else text."""
    words = {"true": True, "false": False, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def class_item(c: Any) -> int | str:
    """One requested class: an id (a whole number, not a bool or float) or a name."""
    if isinstance(c, Tensor) and c.numel() == 1 or isinstance(c, (np.ndarray, np.generic)) and c.size == 1:
        c = c.item()
    if isinstance(c, numbers.Integral) and not isinstance(c, bool):
        return int(c)
    if isinstance(c, str):
        return c
    raise CamframeError(f"a class is an id or a name, not {type(c).__name__} {c!r}")


def class_ids(target: Any, adapter: Adapter, model: nn.Module) -> list[int]:
    """Class ids for ``target`` (an id or name, or a sequence/array of them), each once, in order."""
    if isinstance(target, (Tensor, np.ndarray)) and target.ndim > 0:
        target = list(target.reshape(-1))
    items = list(target) if isinstance(target, (list, tuple)) else [target]
    if not items:
        raise CamframeError("no classes to explain: the class list is empty")
    ids = adapter.resolve_classes([class_item(c) for c in items], model)
    return list(dict.fromkeys(ids))


def scores(value: Any, batch: int) -> Tensor:
    """A target callable's result as ``(batch,)``: it must be one score per image, 1-D or (B, 1)."""
    ok = isinstance(value, Tensor) and value.ndim in (1, 2) and len(value) == batch \
        and (value.ndim == 1 or value.shape[1] == 1)
    if not ok:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise CamframeError(f"a target callable must return a tensor of one score per image, shape ({batch},) "
                            f"or ({batch}, 1); got {got}")
    return value.reshape(-1)


def image_list(images: Any) -> list[Any]:
    """Paths or arrays as a non-empty list (one path or array becomes a list of one)."""
    if isinstance(images, (str, np.ndarray)) or hasattr(images, "__fspath__"):
        return [images]
    try:
        items = list(images)
    except TypeError:
        raise CamframeError(f"expected image paths, RGB arrays or a (B, C, H, W) tensor, "
                            f"not {type(images).__name__}") from None
    if not items:
        raise CamframeError("no images given")
    return items


def rgb_array(a: np.ndarray) -> np.ndarray:
    """``a`` if it is a non-empty RGB uint8 image ``(H, W, 3)``."""
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or a.size == 0:
        raise CamframeError(f"expected non-empty RGB uint8 images (H, W, 3), got {a.dtype} {a.shape}")
    return a


def tensor_batch(x: Tensor, channels: int) -> Tensor:
    """``x`` if it is a non-empty floating ``(B, channels, H, W)`` batch."""
    if x.ndim != 4 or x.numel() == 0 or not x.is_floating_point():
        raise CamframeError(f"expected a non-empty floating (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise CamframeError(f"the model takes {channels}-channel input, got a tensor of shape {tuple(x.shape)}")
    return x


def input_channels(model: nn.Module, adapter: Adapter) -> int:
    """Channels the model takes: its first 2-D convolution's ``in_channels`` (unless still lazy),
    else those of the adapter's example input."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None and conv.in_channels else int(adapter.example_input(model).shape[1])
