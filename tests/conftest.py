import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparkmim.backbones import TESTED_TIMM as TIMM_ZOO
from sparkmim.backbones import TESTED_TIMM_SLOW as TIMM_ZOO_SLOW
from sparkmim.backbones import TESTED_TORCHVISION as TORCHVISION_ZOO

P = 32  # total stride of every zoo model
__all__ = ["P", "TIMM_ZOO", "TIMM_ZOO_SLOW", "TORCHVISION_ZOO", "write_noise_images", "fresh", "buffers",
           "projected_run", "loss_and_gradients"]


def write_noise_images(root: Path, count: int, size: tuple[int, int], seed: int, suffix: str = ".png") -> Path:
    """``count`` random RGB images of ``size`` (h, w) in ``root``, named 00, 01, ..."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"{i:02d}{suffix}")
    return root


def fresh(enc):
    """An independent copy (weights, buffers and hooks) of an encoder; the global RNG is reset so
    stochastic layers (stochastic depth in torchvision models) draw the same numbers each run."""
    torch.manual_seed(1234)
    return copy.deepcopy(enc)


def buffers(enc):
    return {k: v.clone() for k, v in enc.model.named_buffers()}


def projected_run(enc, x, masks=None, train=True):
    """A fresh copy of ``enc`` run densely (``masks`` None) or sparsely: its features, the
    gradients of a fixed random projection of them, and its buffers afterwards."""
    e = fresh(enc).train(train)
    feats = e(x) if masks is None else e(x, masks)
    weights = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i), dtype=f.dtype)
               for i, f in enumerate(feats)]
    sum((f * w).sum() for f, w in zip(feats, weights)).backward()
    grads = {k: p.grad.clone() for k, p in e.model.named_parameters() if p.grad is not None}
    return feats, grads, buffers(e)


def loss_and_gradients(model, loss_fn):
    """``loss_fn()`` and the gradients it gives every parameter of ``model`` (zeroed first)."""
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
