"""The reference form's meaning of each layer and op kind: run densely, then mask.

Each handler takes the forward pass's context (:class:`~.context.SparseContext`), the torch
function (already in its ``torch.nn.functional`` spelling, see :mod:`.table`) and the call's
arguments. Masked sites are absent:

* a masked site acts like padding: convolution and interpolation read it as zero, max pooling
  ignores it, average pooling counts it as zero or leaves it out of the mean exactly as it does
  padding (``count_include_pad``); outputs exist at visible sites only;
* batch norm computes batch statistics (and updates running statistics) from visible sites
  only; group and instance norm use per-sample statistics over visible sites;
* global reductions over the spatial dims (the mean in squeeze-excitation, ECA, split
  attention, the spatial norm of GRN, adaptive pooling to 1x1) run over visible sites only;
* per-site operations (activations, 1x1 work on channels-last tensors, LayerNorm over
  channels, reshapes that keep the spatial dims) run unchanged.

Each layer runs densely and the result is masked, which is simple and obviously equal to the
sparse definition; the fast form (:mod:`.fast`, :mod:`.algebra`) is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..norms import masked_batch_norm, masked_group_stats_norm
from .context import SparseContext
from .ops import (
    MASKED_REDUCTIONS,
    adaptive_output_size,
    keeps_spatial,
    reduced_dims,
    take_reduction_dim,
    tensors,
)

__all__ = ["mask_in_out", "avg_pool", "max_pool", "adaptive_pool", "batch_norm", "group_norm", "instance_norm",
           "channel_norm", "channel_linear", "mask_in", "rearrange", "reduce", "refuse_unknown"]


# -- layers ----------------------------------------------------------------------------------------
def mask_in_out(ctx: SparseContext, func, x, /, *args, **kwargs):
    """Convolution, transposed convolution, interpolation: masked inputs read as zero, outputs
    kept at visible sites only."""
    return ctx.mask_output(func(ctx.mask_input(x), *args, **kwargs), func)


def avg_pool(ctx: SparseContext, func, x, kernel_size, stride=None, padding=0, ceil_mode=False,
             count_include_pad=True, divisor_override=None):
    """Masked sites act as padding: counted as zeros when padding is, else left out of the mean."""
    f = ctx.factor_of(x)
    args = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    if f is None or count_include_pad or divisor_override is not None:
        return ctx.mask_output(func(ctx.mask_input(x), *args), func)
    visible = ctx.mask_for(x, f)
    total = func(torch.where(visible, x, 0.0), *args)
    share = func(visible.to(x.dtype), *args)  # fraction of each window's non-padding sites that are visible
    return ctx.mask_output(total / share.clamp_min(torch.finfo(x.dtype).tiny), func)


def max_pool(ctx: SparseContext, func, x, /, *args, **kwargs):
    """Masked sites are ignored (read as ``-inf``)."""
    f = ctx.factor_of(x)
    if f is not None:
        x = x.masked_fill(~ctx.mask_for(x, f), float("-inf"))
    return ctx.mask_output(func(x, *args, **kwargs), func)


def adaptive_pool(ctx: SparseContext, func, x, output_size, /, *args, **kwargs):
    """Pooling to 1x1 (1x1x1) over visible sites only (pooling to the map's own size does nothing)."""
    f = ctx.factor_of(x)
    if f is None:
        return func(x, output_size, *args, **kwargs)
    n = ctx.spatial_dims
    size = adaptive_output_size(output_size, x.shape, n)
    if size == tuple(x.shape[-n:]):
        return ctx.mask_output(x, func)
    if size != (1,) * n or args or kwargs.get("return_indices"):
        ctx.fail(func, x, f"pools to {size}, which only has a sparse meaning for {'x'.join('1' * n)}")
    mask = ctx.mask_for(x, f)
    dims = tuple(range(-n, 0))
    if func in (F.adaptive_max_pool2d, F.adaptive_max_pool3d):
        return x.masked_fill(~mask, float("-inf")).amax(dim=dims, keepdim=True)
    kept = torch.where(mask, x, 0.0).sum(dim=dims, keepdim=True)
    return kept / mask.sum(dim=dims, keepdim=True).to(x.dtype)


def batch_norm(ctx: SparseContext, func, x, running_mean, running_var, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5):
    f = ctx.factor_of(x)
    if f is None:
        return func(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if x.dim() != ctx.spatial_dims + 2:
        ctx.fail(func, x, f"is a batch norm over a map that is not {ctx.spatial_dims + 2}-D")
    return masked_batch_norm(x, ctx.masks, f, running_mean, running_var, weight, bias, training, momentum, eps,
                             ctx.sync_group)


def group_norm(ctx: SparseContext, func, x, num_groups, weight=None, bias=None, eps=1e-5):
    f = ctx.factor_of(x)
    if f is None:
        return func(x, num_groups, weight, bias, eps)
    if x.dim() != ctx.spatial_dims + 2:
        ctx.fail(func, x, f"is a group norm over a map that is not {ctx.spatial_dims + 2}-D")
    return masked_group_stats_norm(x, ctx.masks.at(f), num_groups, weight, bias, eps)


def instance_norm(ctx: SparseContext, func, x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    f = ctx.factor_of(x)
    if f is None:
        return func(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if not use_input_stats:
        return ctx.mask_output(func(x, running_mean, running_var, weight, bias, False, momentum, eps), func)
    if running_mean is not None or x.dim() != ctx.spatial_dims + 2:
        ctx.fail(func, x, "is an instance norm with running statistics, which is not supported")
    return masked_group_stats_norm(x, ctx.masks.at(f), x.shape[1], weight, bias, eps)


def channel_norm(ctx: SparseContext, func, x, normalized_shape, /, *args, **kwargs):
    """LayerNorm / RMSNorm: per site when normalising the channels of a channels-last map."""
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    if ctx.factor_of_channels_last(x) is not None and n == 1:
        return func(x, normalized_shape, *args, **kwargs)
    if ctx.factor_of(x) is not None:
        ctx.fail(func, x, "normalises over spatial dims")
    return func(x, normalized_shape, *args, **kwargs)


def channel_linear(ctx: SparseContext, func, x, /, *args, **kwargs):
    """Linear over the channels of a channels-last map (not over the width of a channels-first one)."""
    if ctx.factor_of(x) is not None and ctx.factor_of_channels_last(x) is None:
        ctx.fail(func, x, "mixes the width dim of a channels-first map")
    return func(x, *args, **kwargs)


def per_channel(ctx: SparseContext, func, x, /, *args, **kwargs):
    """A per-site layer with a value per channel (PReLU) or per sample and channel (channel
    dropout, ``F.dropout2d`` / ``F.dropout3d``) that keeps zeros at zero: run as it is."""
    return func(x, *args, **kwargs)


def mask_in(ctx: SparseContext, func, x, /, *args, **kwargs):
    """Padding: masked inputs read as zero; the padded result is left to the next layer."""
    return func(ctx.mask_input(x), *args, **kwargs)


# -- op kinds ----------------------------------------------------------------------------------------
def rearrange(ctx: SparseContext, func, args, kwargs):
    """Reshapes, permutations, splits, indexing, joins: allowed when the spatial dims survive intact."""
    grid_in = [t for t in tensors(args[:1], {}) if ctx.factor_of(t) or ctx.factor_of_channels_last(t)]
    out = func(*args, **kwargs)
    if grid_in:
        first = grid_in[0]
        n = ctx.spatial_dims
        sizes = tuple(first.shape[-n:] if ctx.factor_of(first) is not None else first.shape[1: n + 1])
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, Tensor) and not keeps_spatial(o, ctx.batch, sizes):
                ctx.fail(func, first, f"rearranges the spatial dims (result {tuple(o.shape)})")
    return out


def reduce(ctx: SparseContext, func, name: str, args, kwargs):
    """Reductions: unchanged over channel or group dims; over both spatial dims over the visible
    sites only, where a masked meaning exists (:data:`~.ops.MASKED_REDUCTIONS`)."""
    x = args[0]
    if not isinstance(x, Tensor) or (name in ("max", "min") and len(args) > 1 and isinstance(args[1], Tensor)):
        return func(*args, **kwargs)  # not a map, or the elementwise maximum / minimum
    if ctx.factor_of(x) is None and ctx.factor_of_channels_last(x) is None:
        return func(*args, **kwargs)
    dims = set(reduced_dims(take_reduction_dim(name, list(args[1:]), dict(kwargs)), x.dim()))
    mask = _mask_of_reduced_sites(ctx, func, x, dims)
    if mask is None:
        return func(*args, **kwargs)
    if name not in MASKED_REDUCTIONS:
        ctx.fail(func, x, f"reduces over the spatial dims with '{name}', which has no masked form here")
    rest = args[1:]
    if name in ("amax", "max"):
        return func(x.masked_fill(~mask, float("-inf")), *rest, **kwargs)
    if name in ("amin", "min"):
        return func(x.masked_fill(~mask, float("inf")), *rest, **kwargs)
    kept = torch.where(mask, x, 0.0)
    if name in ("mean", "nanmean"):
        fraction = func(mask.to(x.dtype).expand_as(x), *rest, **kwargs)
        return func(kept, *rest, **kwargs) / fraction
    return func(kept, *rest, **kwargs)


def _mask_of_reduced_sites(ctx: SparseContext, func, x: Tensor, dims: set[int]) -> Tensor | None:
    """The visible-site mask of ``x`` (channels first, else last) when ``dims`` cover all its
    spatial dims; None when they cover none; refused when they cover some."""
    nd, n = x.dim(), ctx.spatial_dims
    first, last = ctx.factor_of(x), ctx.factor_of_channels_last(x)
    spatial_first, spatial_last = set(range(nd - n, nd)), set(range(1, n + 1))
    if first is not None and spatial_first <= dims:
        return ctx.mask_for(x, first)
    if last is not None and spatial_last <= dims:
        return ctx.mask_channels_last(last)
    if (first is not None and not dims & spatial_first) or (last is not None and not dims & spatial_last):
        return None
    ctx.fail(func, x, f"reduces over part of the spatial dims (dims {sorted(dims)})")


def refuse_unknown(ctx: SparseContext, func, args, kwargs):
    """An operation with no known meaning: run it, and refuse if it computed a tensor from a map."""
    out = func(*args, **kwargs)
    if any(isinstance(o, Tensor) for o in (out if isinstance(out, (tuple, list)) else (out,))):
        for t in tensors(args, kwargs):
            if ctx.factor_of(t) is not None or ctx.factor_of_channels_last(t) is not None:
                ctx.fail(func, t, "is not known to have a sparse meaning")
    return out  # metadata queries (is_*, sizes, flags) return no tensor
