"""Normalisation over visible sites, and batch statistics across ranks.

Both halves of the model stand on this module: the sparse encoder's batch, group and instance
norms (``sparkmim.sparse``) and the densify / decoder norms (``sparkmim.decoder``). Nothing here
knows about torch function modes or sparse maps: the functions take plain tensors, a
:class:`~sparkmim.masking.MaskPyramid` where a mask is needed, and an optional process group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masking import MaskPyramid

__all__ = ["batch_norm_rows", "masked_batch_norm", "masked_group_stats_norm", "like_format", "memory_format_of",
           "SyncableBatchNorm", "MaskedBatchNorm", "ChannelLayerNorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``; the gradient of every rank's input is the sum of the
    gradients of every rank's output."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def batch_norm_rows(rows: Tensor, running_mean, running_var, weight, bias, training: bool, momentum, eps: float,
                    group=None) -> Tensor:
    """Batch norm of ``(N, C)`` rows or ``(N, C, *)`` tiles (statistics over every dim but ``C``);
    with a process ``group`` in training, the batch statistics are those of every rank (two
    all-reduces, differentiable)."""
    if group is None or not training:
        return F.batch_norm(rows, running_mean, running_var, weight, bias, training,
                            0.1 if momentum is None else momentum, eps)
    c = rows.shape[1]
    dims = [0, *range(2, rows.dim())]
    shape = (1, c, *([1] * (rows.dim() - 2)))
    local = torch.cat([rows.sum(dims), rows.new_full((1,), float(rows.numel() // c))])
    total = _AllReduceSum.apply(local, group)
    count = total[c]
    mean = total[:c] / count
    centred = rows - mean.view(shape)
    var = _AllReduceSum.apply(centred.pow(2).sum(dims), group) / count
    out = centred * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape) + bias.view(shape)
    if running_mean is not None:
        m = 0.1 if momentum is None else momentum
        with torch.no_grad():
            running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp_min(1), alpha=m)
    return out


def masked_batch_norm(x: Tensor, masks: MaskPyramid, factor, running_mean, running_var, weight, bias,
                      training: bool, momentum, eps: float, group=None) -> Tensor:
    """Batch norm of a channels-first map ``(B, C, *spatial)`` (2-D or 3-D) whose statistics come
    from visible sites only (of all ranks in ``group``); zero elsewhere."""
    b, c, *sizes = x.shape
    visible = masks.at(factor)
    if not training and running_mean is not None:
        out = F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum or 0.0, eps)
        return torch.where(visible, out, 0.0)
    idx = masks.rows(factor)
    rows = x.movedim(1, -1).reshape(-1, c).index_select(0, idx)
    out_rows = batch_norm_rows(rows, running_mean, running_var, weight, bias, training, momentum, eps, group)
    out = out_rows.new_zeros(x.numel() // c, c).index_copy(0, idx, out_rows)
    return like_format(out.view(b, *sizes, c).movedim(-1, 1), x)


def masked_group_stats_norm(x: Tensor, visible: Tensor, groups: int, weight, bias, eps: float) -> Tensor:
    """Per-sample, per-group normalisation of a channels-first map ``(B, C, *spatial)`` with
    moments over its ``visible`` sites only (group norm; instance norm with ``groups`` =
    channels); zero elsewhere."""
    b, c = x.shape[:2]
    sites = math.prod(x.shape[2:])
    m = visible.to(x.dtype).view(b, 1, 1, sites)
    xg = x.reshape(b, groups, c // groups, sites)
    count = m.sum(dim=(2, 3), keepdim=True) * (c // groups)
    mean = (xg * m).sum(dim=(2, 3), keepdim=True) / count
    centred = (xg - mean) * m
    var = (centred * centred).sum(dim=(2, 3), keepdim=True) / count
    out = (centred * torch.rsqrt(var + eps)).view(x.shape)
    per_channel = (1, c, *([1] * (x.dim() - 2)))
    if weight is not None:
        out = out * weight.view(per_channel)
    if bias is not None:
        out = out + bias.view(per_channel)
    return torch.where(visible, out, 0.0)


def memory_format_of(t: Tensor) -> torch.memory_format:
    """``channels_last`` (``channels_last_3d``) for a 4-D (5-D) tensor laid out so (and not also
    contiguous), else ``contiguous_format``."""
    last = _CHANNELS_LAST.get(t.dim())
    if last is not None and not t.is_contiguous() and t.is_contiguous(memory_format=last):
        return last
    return torch.contiguous_format


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by tensor rank


def like_format(out: Tensor, like: Tensor) -> Tensor:
    """``out`` (4-D) in ``like``'s memory format: channels-last if ``like`` is, else contiguous.
    Layers that compute on channels-last rows use it so that a model keeps the layout of its
    input (on CPUs, convolution backward is much slower on channels-last maps of few channels)."""
    return out.contiguous(memory_format=memory_format_of(like))


class SyncableBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, once ``sync_group`` is set, takes training statistics over all ranks
    (on CPU/gloo as well as on GPUs); the state-dict keys are BatchNorm2d's (which are
    BatchNorm3d's too). It also normalises 3-D maps ``(B, C, D, H, W)``, for the 3-D decoder."""

    sync_group = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (4, 5):
            raise ValueError(f"expected a 4-D or 5-D input, got {input.dim()}-D")

    def _count_batch_and_arguments(self) -> tuple:
        """Count this batch (``num_batches_tracked``, as ``BatchNorm2d.forward`` does) and return
        the ``(running_mean, running_var, weight, bias, training, momentum, eps)`` to normalise with."""
        momentum = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        keep_running = not self.training or self.track_running_stats
        return (self.running_mean if keep_running else None, self.running_var if keep_running else None,
                self.weight, self.bias, self.training or self.running_mean is None, momentum, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.sync_group is None or not self.training:
            return super().forward(x)
        b, c, *sizes = x.shape
        rows = batch_norm_rows(x.movedim(1, -1).reshape(-1, c), *self._count_batch_and_arguments(),
                               group=self.sync_group)
        return like_format(rows.view(b, *sizes, c).movedim(-1, 1), x)


class MaskedBatchNorm(SyncableBatchNorm):
    """BatchNorm whose batch (and running) statistics come from visible sites only."""

    def forward(self, x: Tensor, masks: MaskPyramid, factor) -> Tensor:  # type: ignore[override]
        return masked_batch_norm(x, masks, factor, *self._count_batch_and_arguments(), group=self.sync_group)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW (or NCDHW) map, at every site. It needs no mask (each site is
    normalised on its own; masked sites are replaced by the mask token afterwards): ``masks`` and
    ``factor`` are accepted so that it can stand where :class:`MaskedBatchNorm` does."""

    def forward(self, x: Tensor, masks: MaskPyramid | None = None, factor=1) -> Tensor:  # type: ignore[override]
        out = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return like_format(out.movedim(-1, 1), x)
