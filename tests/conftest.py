from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparkmim.backbones import TESTED_TIMM as TIMM_ZOO
from sparkmim.backbones import TESTED_TIMM_SLOW as TIMM_ZOO_SLOW
from sparkmim.backbones import TESTED_TORCHVISION as TORCHVISION_ZOO

P = 32  # total stride of every zoo model
__all__ = ["P", "TIMM_ZOO", "TIMM_ZOO_SLOW", "TORCHVISION_ZOO", "write_noise_images"]


def write_noise_images(root: Path, count: int, size: tuple[int, int], seed: int, suffix: str = ".png") -> Path:
    """``count`` random RGB images of ``size`` (h, w) in ``root``, named 00, 01, ..."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"{i:02d}{suffix}")
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
