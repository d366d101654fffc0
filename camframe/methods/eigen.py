"""The ``eigen`` smoothing as a method: a weighting's per-channel terms projected on their first
principal component (``Explainer(smooth="eigen")`` wraps the chosen method with it)."""

from __future__ import annotations

import torch
from torch import Tensor

from camframe.core.errors import CamframeError
from camframe.methods.weightings import Method, eigencam, method

__all__ = ["eigen"]


def eigen(base: Method) -> Method:
    """``base`` with its sum over channels replaced by the projection of its per-channel terms
    (``G⊙A`` for ``elementwise``, ``mean(G)·A`` for ``gradcam``...) on their first principal
    component (pytorch-grad-cam's ``get_2d_projection``), signed to correlate positively with the
    unsmoothed map. The terms are ``base`` applied to each channel alone, which is exact for every
    built-in method (each weighs a channel by its own activations and gradients only)."""
    if not getattr(base, "needs_gradients", True):
        raise CamframeError("smoothing eigen projects gradient-weighted activations; a gradient-free method "
                            "(eigencam) already is a principal component: use it without --smooth")

    @method()
    def projected(activations: Tensor, gradients: Tensor) -> Tensor:
        u, c, h, w = activations.shape
        terms = base(activations.reshape(u * c, 1, h, w), gradients.reshape(u * c, 1, h, w)).reshape(u, c, h, w)
        plain = terms.sum(1).clamp(min=0).flatten(1)
        pc = eigencam(terms).flatten(1)
        agree = ((pc - pc.mean(1, keepdim=True)) * (plain - plain.mean(1, keepdim=True))).sum(1)
        return (pc * torch.where(agree < 0, -1.0, 1.0)[:, None]).reshape(u, h, w).to(activations.dtype)

    return projected
