"""Optimisation shared by pre-training and fine-tuning: parameter groups, lr and weight-decay
schedules, the one global gradient clip, and LAMB."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["param_groups", "Schedule", "clip_grad_norm_", "lamb", "default_betas"]


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weights of convolutions and linear layers only: not on biases, norm
    parameters, mask tokens (any parameter with fewer than 2 dims, or named mask_token)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False, "weight_decay": 0.0}]


@dataclass
class Schedule:
    """Per-optimiser-step lr (linear warm-up, then cosine) and weight decay (cosine).

    As in the reference recipe, both cosines reach their final value at the last step of the
    run, ``total_steps - 1``."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    warmup_start_ratio: float = 0.005
    final_lr_ratio: float = 0.001
    wd: float = 0.04
    wd_end: float = 0.2

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            a = self.warmup_start_ratio
            return self.peak_lr * (a + (1 - a) * step / self.warmup_steps)
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        end = self.peak_lr * self.final_lr_ratio
        return end + (self.peak_lr - end) * 0.5 * (1 + math.cos(math.pi * t))

    def weight_decay(self, step: int) -> float:
        t = min(1.0, step / max(1, self.total_steps - 1))
        return self.wd_end + (self.wd - self.wd_end) * 0.5 * (1 + math.cos(math.pi * t))


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """The global L2 norm of the gradients before clipping, as a 0-dim tensor on their device
    (no host synchronisation); when ``max_norm > 0`` the gradients are divided in place by
    ``max(1, norm / max_norm)``.

    This is the clip the reference recipe applies once, inside its LAMB step. It differs from
    ``torch.nn.utils.clip_grad_norm_`` (which multiplies by ``max_norm / (norm + 1e-6)``) in the
    last digits only, but it keeps a run's trajectory equal to the reference's. The optimiser
    that follows must not clip again (:func:`lamb` does not)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm > 0:
        torch._foreach_div_(grads, (norm / max_norm).clamp(min=1.0))
    return norm


def default_betas(backbone: nn.Module) -> tuple[float, float]:
    """LAMB betas of the reference recipe, by the backbone's norm layers: (0.9, 0.95) for batch-norm
    networks (ResNets), (0.9, 0.999) for layer-norm networks (ConvNeXts)."""
    from .backbones import norm_kind

    return (0.9, 0.999) if norm_kind(backbone) == "ln" else (0.9, 0.95)


def lamb(groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
         weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """timm's LAMB without its own gradient clip (timm clips the global norm at 1.0 by default;
    the one clip is :func:`clip_grad_norm_`)."""
    from timm.optim import Lamb

    return Lamb(groups, lr=lr, betas=betas, weight_decay=weight_decay, max_grad_norm=None)
