"""A layer whose output is a dict subclass read by attribute (like Hugging Face's ``ModelOutput``)
is recorded and handed on as its own type, so the model's next module can still read it."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from camframe import Explainer


class Output(OrderedDict):
    """An ordered dict whose items are also attributes, as ``transformers.utils.ModelOutput``."""

    def __getattr__(self, name: str) -> Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Output:
        return Output(features=self.conv(x).relu(), size=torch.tensor(x.shape[-2:]))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).features.mean((2, 3)))  # attribute access, as HF models do


def test_dict_subclass_output_keeps_its_type() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    result = Explainer(model, layers=["encoder"])(torch.rand(1, 3, 8, 8), target=[1])
    assert result.layer_maps["encoder"].shape == (1, 8, 8)
    assert bool(result.reached["encoder"].all())
