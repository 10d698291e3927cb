"""Optimisation shared by pre-training and fine-tuning: parameter groups, lr and weight-decay
schedules, the one global gradient clip, and LAMB."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["param_groups", "Schedule", "clip_grad_norm_", "Lamb", "lamb", "hold_on_device", "set_hyper", "default_betas"]


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


class Lamb(torch.optim.Optimizer):
    """LAMB over all of a group's tensors at once, with one clip outside it (:func:`clip_grad_norm_`).

    The reference recipe's LAMB (Adam moments with bias correction; weight decay added to the
    update; the layer-wise trust ratio ``||w|| / ||u||`` where the group's weight decay is not
    zero), computed with ``torch._foreach_*`` calls: a handful of operations per parameter group
    instead of a dozen per tensor. The step count lives on the parameters' device, and ``lr`` and
    ``weight_decay`` may be given as 0-dim tensors there (:func:`hold_on_device`), so a step reads
    no value on the host and can be captured in a CUDA graph. Plain float hyper-parameters work
    too (fine-tuning writes them per group). The state (``exp_avg``, ``exp_avg_sq``, the group's
    ``step``) has the names timm's ``Lamb`` uses, so its checkpoints load."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"LAMB betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _state(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        for p in params:
            if not self.state[p]:
                self.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        return [self.state[p]["exp_avg"] for p in params], [self.state[p]["exp_avg_sq"] for p in params]

    def _step_group(self, group: dict, params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs = self._state(params)
        (beta1, beta2), eps = group["betas"], group["eps"]
        step = _on_device(group, "step", params[0], 0.0)
        step.add_(1)
        lr, wd = _hyper(group, "lr", params[0]), _hyper(group, "weight_decay", params[0])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        # u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) (+ wd * w)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, (1 - torch.pow(beta2, step)).sqrt())
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(exp_avgs, denom)
        torch._foreach_div_(updates, 1 - torch.pow(beta1, step))
        if isinstance(wd, Tensor) or wd != 0:
            if isinstance(wd, Tensor):
                torch._foreach_add_(updates, torch._foreach_mul(params, wd))
            else:
                torch._foreach_add_(updates, params, alpha=wd)
            w_norm, u_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(updates))
            adapt = (w_norm > 0) & (u_norm > 0) & (wd != 0)  # a tensor weight decay of 0 adapts nothing, as a float 0
            scale = torch.where(adapt, w_norm / u_norm, 1.0).to(params[0].dtype) * -lr
            torch._foreach_mul_(updates, scale.unbind(0))
        else:
            torch._foreach_mul_(updates, -lr)
        torch._foreach_add_(params, updates)


def _on_device(group: dict, key: str, like: Tensor, default: float) -> Tensor:
    """``group[key]`` as a 0-dim tensor on ``like``'s device (float64 for float64 parameters,
    else float32); converted and stored back once."""
    value = group.get(key, default)
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if not isinstance(value, Tensor) or value.device != like.device or value.dtype != dtype:
        value = group[key] = torch.as_tensor(value, dtype=dtype).to(like.device)
    return value


def _hyper(group: dict, key: str, like: Tensor) -> Tensor | float:
    """A float hyper-parameter as given, a tensor one on the parameters' device."""
    value = group[key]
    return _on_device(group, key, like, 0.0) if isinstance(value, Tensor) else value


def hold_on_device(optimizer: torch.optim.Optimizer, keys: tuple[str, ...] = ("lr", "weight_decay")) -> None:
    """Keep ``keys`` of every parameter group as 0-dim tensors on the parameters' device, so that
    writing the schedule into them (:func:`set_hyper`) and stepping read no host value. A group's
    weight decay stays a plain 0 when the group is not decayed (``decay`` False, or absent and 0)."""
    for group in optimizer.param_groups:
        for key in keys:
            if key == "weight_decay" and not group.get("decay", group[key] != 0):
                continue
            _on_device(group, key, group["params"][0], 0.0)


def set_hyper(group: dict, key: str, value: float) -> None:
    """Write a scheduled value into a parameter group: in place when it is held as a tensor."""
    if isinstance(group.get(key), Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


def lamb(groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
         weight_decay: float = 0.0) -> Lamb:
    """LAMB (:class:`Lamb`) without a clip of its own: the one clip is :func:`clip_grad_norm_`."""
    return Lamb(groups, lr=lr, betas=betas, weight_decay=weight_decay)
