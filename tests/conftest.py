import pytest
import torch

from sparkmim.backbones import TESTED_TIMM as TIMM_ZOO
from sparkmim.backbones import TESTED_TIMM_SLOW as TIMM_ZOO_SLOW
from sparkmim.backbones import TESTED_TORCHVISION as TORCHVISION_ZOO

P = 32  # total stride of every zoo model
__all__ = ["P", "TIMM_ZOO", "TIMM_ZOO_SLOW", "TORCHVISION_ZOO"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
