"""A seeded tiny classifier as module source, for tests whose subprocesses or Ray workers import it."""

from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = '''import torch
from torch import nn


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
'''


def write_inputs(root: Path, count: int, size: tuple[int, int]) -> None:
    """``root/tinymod.py`` (``tinymod:tiny``) and ``count`` seeded random pictures ``root/in/imNNN.png``."""
    (root / "tinymod.py").write_text(SOURCE)
    rng = np.random.default_rng(0)
    (root / "in").mkdir()
    for i in range(count):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(root / "in" / f"im{i:03d}.png")
