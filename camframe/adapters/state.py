"""Put a model in explaining state and give it back exactly as it came."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from camframe.core.errors import CamframeError

__all__ = ["explaining", "refuse_inference_tensors"]


def refuse_inference_tensors(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers were made under ``torch.inference_mode()``.

    Autograd cannot save such tensors for a backward pass, nor set their ``requires_grad`` back,
    so explaining one would fail midway and leave it altered. camframe refuses rather than copy
    it on the generic path (a copy would not be the model the user holds); an adapter that
    explains a private copy anyway (``copy.deepcopy`` gives normal tensors, as YOLO's
    ``prepare`` does) takes such a model, since only the copy reaches this check.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    name = next((n for n, t in tensors if t.is_inference()), None)
    if name is not None:
        raise CamframeError(f"the model was built under torch.inference_mode() (tensor {name!r} is an inference "
                            "tensor, which autograd cannot use): build it outside inference mode, "
                            "or pass copy.deepcopy(model)")


@contextmanager
def explaining(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters inside; training flags and ``requires_grad`` restored after.

    A model with inference tensors is refused (``CamframeError``) before anything is touched.

    Args:
        model: the model to guard.

    Returns:
        A context manager that yields ``model``.
    """
    refuse_inference_tensors(model)
    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for m, _ in training:  # not model.eval(): a wrapper may override train() (Ultralytics' starts training)
            m.training = False
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)
