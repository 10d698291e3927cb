"""The fast form's layer kernels: layers computed at visible sites only, on a map's tiles.

Each handler has the reference handler's signature (see :mod:`.table`) and meaning:

* the same handlers serve images (``conv2d``, ...) and volumes and clips (``conv3d``, ...), with
  a tile size and stride per axis;
* convolutions and pooling whose windows stay inside a patch (1x1, kernel = stride) run on the
  tiles as they are; other windowed layers run on each tile with its halo, gathered from the
  neighbouring visible tiles (``0``, or ``-inf`` for max pooling, where a neighbour is masked),
  so only visible outputs are computed, with the dense layer's own kernel; where each tile has
  a single output site, a convolution is one matrix product of the windows (im2col);
* batch norm takes its statistics from the tiles directly (of every rank, with a sync group);
  group and instance norm use a per-sample view of them; norms and ``Linear`` over channels run
  on the tiles;
* calls a kernel does not cover (transposed or ``padding="same"`` convolutions of even
  kernels, strides that leave the grid, windows of average pooling across patches, ...) answer
  :data:`~.ops.ON_CANVAS`: the reference handler runs on the canvas (:func:`on_canvas`);
* pooling to ``1 x 1`` is a mean (or maximum) over each sample's tiles.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..masking import per_axis
from ..norms import batch_norm_rows
from . import reference
from .context import FastContext
from .ops import ON_CANVAS, adaptive_output_size
from .tiles import SparseMap

__all__ = ["on_canvas", "conv", "max_pool", "avg_pool", "adaptive_pool", "batch_norm", "group_norm",
           "instance_norm", "channel_norm", "channel_linear", "prelu", "channel_dropout", "pad_on_canvas"]


CANVAS_DEPTHWISE_BELOW = {"cpu": 4, "cuda": 16}
"""Per device type: depthwise convolutions whose output tiles are smaller than this (sites per
side, along every axis) run on the zero canvas, for images (``CANVAS_DEPTHWISE_DIMS``: the
spatial dims where this was measured; volumes keep the halo). ConvNeXt-Small's 7x7 depthwise layers on a 2x2 tile read an 8x8
halo (16x the tile). On CPU the canvas is faster below 4 (ConvNeXt-Small forward + backward,
224 px, batch 8: 4.3 s against 4.7 s). On CUDA it is faster at every tile size ConvNeXt-Small
has (8, 4, 2, 1 sites; H200, bf16, channels-last, batch 128, 224 px, encoder forward + backward:
177 ms with halos everywhere, 103 ms below 4, 98 below 8, 87 below 16; whole step 235, 157, 148,
139 ms; ``benchmarks/step.py``, lever ``dwcanvasN``). Other device types use the halo."""

CANVAS_DEPTHWISE_DIMS = frozenset({2})
"""Spatial dims where ``CANVAS_DEPTHWISE_BELOW`` applies (measured on 2-D maps only)."""

_CONV = {2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


IM2COL_ONE_SITE = frozenset({"cpu"})
"""Device types on which a convolution with one output site per tile is one matrix product of the
windows (im2col): on CPU 5x faster than the convolution kernel (3x3, 512 channels, 160 tiles:
10 ms against 57 ms forward and backward); elsewhere the convolution itself, which dispatches
about 8 fewer operations."""


def on_canvas(ctx: FastContext, handler, func, x, /, *args, fill: float = 0.0, **kwargs):
    """Run a reference ``handler`` on the dense canvas of ``x`` (``fill`` at masked sites) and
    gather the visible tiles of its output."""
    dense = x.canvas(fill) if isinstance(x, SparseMap) else x
    out = handler(ctx, func, dense, *args, **kwargs)
    if isinstance(out, (tuple, list)):
        return type(out)([ctx.as_tiles(out[0]), *out[1:]])
    return ctx.as_tiles(out)


def _channels_first(x) -> bool:
    """Whether ``x`` is a channels-first ``(B, C, *spatial)`` map held as tiles."""
    return isinstance(x, SparseMap) and x.spatial_dim == 2 and x.tiles.dim() == x.geometry.spatial_dims + 2


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _output_factor(ctx: FastContext, x: SparseMap, kernel, stride, padding, dilation):
    """Sites per patch of a windowed layer's output, one per axis, when it lies on the mask grid at
    ``factor / stride`` along each axis (each stride dividing the factor, output size ``size /
    stride``, and :meth:`~.context.SparseContext.on_grid`); else None."""
    g = x.geometry
    out = []
    for size, f, k, s, p, d in zip(g.sizes, g.factors, kernel, stride, padding, dilation):
        if f % s or _output_size(size, k, s, p, d) * s != size:
            return None
        out.append(f // s)
    return ctx.on_grid(tuple(out))


def _windowed(ctx: FastContext, x: SparseMap, layer, out_factor, stride, kernel, dilation, padding,
              fill: float = 0.0) -> SparseMap:
    """``layer`` (without padding) applied to each visible tile with the halo its windows read,
    giving the outputs (``out_factor`` sites per patch) of every visible patch."""
    sizes = tuple((fo - 1) * s + d * (k - 1) + 1 for fo, s, k, d in zip(out_factor, stride, kernel, dilation))
    out = layer(x.halo(sizes, tuple(padding), fill))
    return SparseMap(out, ctx.geometry(out_factor), 2)


# -- convolution -------------------------------------------------------------------------------------
def _conv_parameters(args, kwargs) -> tuple:
    """``(weight, bias, stride, padding, dilation, groups)`` of an ``F.conv2d`` / ``F.conv3d`` call."""
    names = ("weight", "bias", "stride", "padding", "dilation", "groups")
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kwargs.items() if k in names})
    return (vals["weight"], vals.get("bias"), vals.get("stride", 1), vals.get("padding", 0), vals.get("dilation", 1),
            vals.get("groups", 1))


def _explicit_padding(padding, kernel, dilation) -> tuple[int, ...] | None:
    """Padding as numbers, one per axis; None for ``"same"`` with an even window (asymmetric padding)."""
    if not isinstance(padding, str):
        return per_axis(padding, len(kernel))
    if padding == "valid":
        return (0,) * len(kernel)
    reach = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if padding == "same" and all(r % 2 == 0 for r in reach):
        return tuple(r // 2 for r in reach)
    return None


def conv(ctx: FastContext, func, x, /, *args, **kwargs):
    """``F.conv2d`` / ``F.conv3d`` at visible sites: on each tile with its halo (the tile alone
    when the windows stay inside it)."""
    x = ctx.as_tiles(x)
    w, b, stride, padding, dilation, groups = _conv_parameters(args, kwargs)
    if not _channels_first(x) or w.dim() != x.tiles.dim():
        return ON_CANVAS
    n = x.geometry.spatial_dims
    kernel, stride, dilation = tuple(w.shape[2:]), per_axis(stride, n), per_axis(dilation, n)
    padding = _explicit_padding(padding, kernel, dilation)
    fo = None if padding is None else _output_factor(ctx, x, kernel, stride, padding, dilation)
    if fo is None:
        return ON_CANVAS
    if fo == (1,) * n and groups == 1 and x.tiles.device.type in IM2COL_ONE_SITE:
        # one output site per tile: the window's products as one matrix product (im2col), several
        # times faster than a convolution over 1 x 1 outputs on CPU
        cols = x.halo(tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation)), padding)
        if any(d != 1 for d in dilation):
            cols = cols[(slice(None), slice(None), *(slice(None, None, d) for d in dilation))]
        out = F.linear(cols.reshape(cols.shape[0], -1), w.reshape(w.shape[0], -1), b)
        return SparseMap(out.view(*out.shape, *(1,) * n), ctx.geometry(fo), 2)
    if n in CANVAS_DEPTHWISE_DIMS and groups > 1 and groups == x.tiles.shape[1] and any(k > 1 for k in kernel) \
            and max(fo) < CANVAS_DEPTHWISE_BELOW.get(x.tiles.device.type, 0):
        # a depthwise convolution with small output tiles: the halo would move several times the
        # data the layer computes on, so the (cheap) layer runs on the zero canvas instead
        return ctx.as_tiles(func(x.canvas(), *args, **kwargs))  # (a channels-last canvas for channels-last tiles)
    layer = _CONV[n]
    return _windowed(ctx, x, lambda t: layer(t, w, b, stride, 0, dilation, groups), fo, stride, kernel,
                     dilation, padding)


# -- pooling -----------------------------------------------------------------------------------------
def _pool_parameters(func, args, kwargs, n: int) -> tuple:
    """``(kernel, stride, padding, dilation, ceil_mode, return_indices)`` of any max-pool spelling,
    one value per axis of an ``n``-D pool."""
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kwargs.items() if k in names})
    k = vals["kernel_size"]
    s = vals.get("stride")
    if s is None or (isinstance(s, (tuple, list)) and len(s) == 0):
        s = k
    return (per_axis(k, n), per_axis(s, n), per_axis(vals.get("padding", 0), n), per_axis(vals.get("dilation", 1), n),
            bool(vals.get("ceil_mode", False)), bool(vals.get("return_indices", False)) or
            func in (F.max_pool2d_with_indices, F.max_pool3d_with_indices))


def max_pool(ctx: FastContext, func, x, /, *args, **kwargs):
    """Max pooling on each tile with its halo, read as ``-inf`` at masked sites."""
    x = ctx.as_tiles(x)
    if not _channels_first(x):
        return ON_CANVAS
    n = x.geometry.spatial_dims
    kernel, stride, padding, dilation, ceil, indices = _pool_parameters(func, args, kwargs, n)
    fo = None if ceil or indices else _output_factor(ctx, x, kernel, stride, padding, dilation)
    if fo is None:
        return ON_CANVAS
    layer = _MAX_POOL[n]
    return _windowed(ctx, x, lambda t: layer(t, kernel, stride, 0, dilation), fo, stride, kernel,
                     dilation, padding, float("-inf"))


def avg_pool(ctx: FastContext, func, x, kernel_size, stride=None, padding=0, ceil_mode=False,
             count_include_pad=True, divisor_override=None):
    """Average pooling whose windows tile the patches (kernel = stride, no padding): on the tiles;
    windows across patch borders run on the canvas."""
    x = ctx.as_tiles(x)
    if not _channels_first(x):
        return ON_CANVAS
    g = x.geometry
    n = g.spatial_dims
    kernel, step = per_axis(kernel_size, n), per_axis(kernel_size if stride is None or stride == [] else stride, n)
    if kernel != step or any(per_axis(padding, n)) or any(f % s for f, s in zip(g.factors, step)):
        return ON_CANVAS
    factor = ctx.on_grid(tuple(f // s for f, s in zip(g.factors, step)))
    if factor is None:
        return ON_CANVAS
    out = _AVG_POOL[n](x.tiles, kernel, step, 0, ceil_mode, count_include_pad, divisor_override)
    return SparseMap(out, ctx.geometry(factor), 2)


def adaptive_pool(ctx: FastContext, func, x, /, output_size, *args, **kwargs):
    """Pooling to a single site: a mean (or maximum) over each sample's tiles."""
    x = ctx.as_tiles(x)
    if not _channels_first(x):
        return ON_CANVAS
    n = x.geometry.spatial_dims
    size = adaptive_output_size(output_size, x.shape, n)
    if size == tuple(x.shape[-n:]):
        return x
    if size != (1,) * n or args or kwargs.get("return_indices"):
        ctx.fail(func, x, f"pools to {size}, which only has a sparse meaning for a single site")
    t = _per_sample(x)  # (B, K, C, *f)
    over = (1, *range(3, n + 3))
    pooled = t.amax(over) if func in (F.adaptive_max_pool2d, F.adaptive_max_pool3d) else t.mean(over)
    return pooled.view(*pooled.shape, *(1,) * n)


# -- norms -------------------------------------------------------------------------------------------
def _per_sample(x: SparseMap):
    """The tiles viewed ``(B, K, ...)``."""
    g = x.geometry
    return x.tiles.view(g.batch, g.tiles // g.batch, *x.tiles.shape[1:])


def _require_channels_first(ctx: FastContext, func, x: SparseMap, what: str) -> None:
    if not _channels_first(x):
        ctx.fail(func, x, f"is a {what} over a map that is not (B, C, *spatial)")


def batch_norm(ctx: FastContext, func, x, running_mean, running_var, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5):
    """Batch norm with the tiles as the batch (of every rank, with a sync group)."""
    x = ctx.as_tiles(x)
    if not isinstance(x, SparseMap):
        return func(x, running_mean, running_var, weight, bias, training, momentum, eps)
    _require_channels_first(ctx, func, x, "batch norm")
    if training or running_mean is None:
        out = batch_norm_rows(x.tiles, running_mean, running_var, weight, bias, True, momentum, eps, ctx.sync_group)
    else:
        out = F.batch_norm(x.tiles, running_mean, running_var, weight, bias, False, momentum or 0.0, eps)
    return x.with_tiles(out)


def _sample_group_norm(x: SparseMap, num_groups: int, weight, bias, eps: float) -> SparseMap:
    """Group norm with each sample's statistics over all its tiles."""
    t = _per_sample(x).transpose(1, 2)  # (B, C, K, *f)
    out = F.group_norm(t, num_groups, weight, bias, eps).transpose(1, 2)
    return x.with_tiles(out.reshape(x.tiles.shape))


def group_norm(ctx: FastContext, func, x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm over each sample's tiles."""
    x = ctx.as_tiles(x)
    if not isinstance(x, SparseMap):
        return func(x, num_groups, weight, bias, eps)
    _require_channels_first(ctx, func, x, "group norm")
    return _sample_group_norm(x, num_groups, weight, bias, eps)


def instance_norm(ctx: FastContext, func, x, running_mean=None, running_var=None, weight=None,
                  bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance norm over each sample's tiles (a group norm with one channel per group); with
    running statistics, per site."""
    x = ctx.as_tiles(x)
    if not isinstance(x, SparseMap):
        return func(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    _require_channels_first(ctx, func, x, "instance norm")
    if not use_input_stats:
        return x.with_tiles(F.instance_norm(x.tiles, running_mean, running_var, weight, bias, False, momentum, eps))
    if running_mean is not None:
        ctx.fail(func, x, "is an instance norm with running statistics, which is not supported")
    return _sample_group_norm(x, x.tiles.shape[1], weight, bias, eps)


def _trailing_channels(x: SparseMap) -> int:
    return x.dim() - (x.spatial_dim + x.geometry.spatial_dims)


def channel_norm(ctx: FastContext, func, x, /, normalized_shape, *args, **kwargs):
    """LayerNorm / RMSNorm over trailing channel dims: on the tiles."""
    if not isinstance(x, SparseMap):
        return reference.channel_norm(ctx, func, x, normalized_shape, *args, **kwargs)
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    if n > _trailing_channels(x):
        ctx.fail(func, x, "normalises over spatial dims")
    return x.with_tiles(func(x.tiles, normalized_shape, *args, **kwargs))


def channel_linear(ctx: FastContext, func, x, /, *args, **kwargs):
    """Linear over the last (channel) dim: on the tiles."""
    if not isinstance(x, SparseMap):
        return reference.channel_linear(ctx, func, x, *args, **kwargs)
    if _trailing_channels(x) < 1:
        ctx.fail(func, x, "mixes the width dim of a channels-first map")
    return x.with_tiles(func(x.tiles, *args, **kwargs))


def prelu(ctx: FastContext, func, x, weight):
    """PReLU (one slope, or one per channel along dim 1): on the tiles of a channels-first map,
    whose dim 1 is the channels as in the map."""
    if not _channels_first(x):
        return ON_CANVAS
    return x.with_tiles(func(x.tiles, weight))


def channel_dropout(ctx: FastContext, func, x, p: float = 0.5, training: bool = True, inplace: bool = False):
    """``F.dropout2d`` / ``F.dropout3d``: whole channels of a sample dropped, as the dense layer
    drops them: the keep-mask ``(B, C, 1, ...)`` is drawn as the dense layer draws it (the same
    random numbers under the same seed), scaled by ``1 / (1 - p)``, and repeated over each
    sample's tiles."""
    if not _channels_first(x):
        return ON_CANVAS
    if not training or p == 0:
        return x
    g = x.geometry
    keep = x.tiles.new_empty((g.batch, x.tiles.shape[1], *(1,) * g.spatial_dims))
    if p == 1:
        keep.zero_()
    else:
        keep.bernoulli_(1 - p).div_(1 - p)
    keep = keep.repeat_interleave(g.tiles // g.batch, dim=0)
    if inplace:
        x.tiles.mul_(keep)
        return x
    return x.with_tiles(x.tiles * keep)


def pad_on_canvas(ctx: FastContext, func, x, /, *args, **kwargs):
    """Padding: the zero canvas, padded (a dense map off the grid, for the next layer to read)."""
    return func(x.canvas() if isinstance(x, SparseMap) else ctx.mask_input(x), *args, **kwargs)
