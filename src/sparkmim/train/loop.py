"""One training step, as a function with explicit arguments: the run loop and the step benchmark
both call it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..masking import MaskPyramid
from ..optim import Schedule, clip_grad_norm_, set_hyper

__all__ = ["NonFiniteLossError", "StepStats", "train_step", "optimizer_step", "apply_schedule"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting good checkpoints."""


@dataclass
class StepStats:
    """What one step leaves behind, on the device (reading it is the caller's choice)."""

    loss_sum: Tensor  # sum of the micro-batches' losses, float64
    micro_batches: int
    grad_norm: Tensor  # the global gradient norm before clipping
    nonfinite: Tensor  # True if a micro-batch's loss was NaN or infinite


def apply_schedule(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> None:
    """Write the step's lr into every parameter group and its weight decay into the decayed ones
    (in place where the optimiser holds them as device tensors)."""
    for group in optimizer.param_groups:
        set_hyper(group, "lr", schedule.lr(step))
        if group.get("decay"):
            set_hyper(group, "weight_decay", schedule.weight_decay(step))


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   clip_grad: float) -> Tensor:
    """One optimiser step on the accumulated gradients: unscale (fp16), clip the global norm once
    at ``clip_grad`` (0: no clip), step, clear the gradients. Returns the global gradient norm
    before clipping, on the device (no host read)."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               micro_batches: Iterable[tuple[Tensor, MaskPyramid]], *, accum_steps: int = 1, clip_grad: float = 5.0,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               ddp: nn.Module | None = None) -> StepStats:
    """Forward and backward of ``accum_steps`` micro-batches ``(images, masks)`` (each loss scaled
    by ``1 / accum_steps``; under DDP the gradients are synchronised with the last one only), then
    :func:`optimizer_step`. ``model`` is the SparK model, ``ddp`` its DistributedDataParallel
    wrapper when there are several ranks. No value is read by the host."""
    net = ddp if ddp is not None else model
    loss_sum = nonfinite = None
    count = 0
    for images, masks in micro_batches:
        count += 1
        last = count == accum_steps
        with net.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with autocast():
                out = net(images, masks)
            loss = out.loss.float()
            scaler.scale(loss / accum_steps if accum_steps > 1 else loss).backward()
        loss = loss.detach()
        loss_sum = loss.double() if loss_sum is None else loss_sum + loss.double()
        bad = (loss - loss) != 0  # NaN and +-inf alike (inf - inf is NaN); two operations where isfinite is five
        nonfinite = bad if nonfinite is None else nonfinite | bad
    if count != accum_steps:
        raise ValueError(f"a step takes {accum_steps} micro-batches, got {count}")
    return StepStats(loss_sum, count, optimizer_step(model, optimizer, scaler, clip_grad), nonfinite)
