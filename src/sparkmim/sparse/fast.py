"""The fast form's layer kernels: layers computed at visible sites only, on a map's rows.

Each handler has the reference handler's signature (see :mod:`.table`) and meaning:

* 1x1 convolutions and ``Linear`` / ``LayerNorm`` on channels-last maps run on the rows;
* batch norm takes its statistics from the rows directly; group and instance norm use a
  per-sample view of them;
* spatial layers (convolutions, max pooling) run on the visible tiles with a halo gathered
  from a zero (or ``-inf``) canvas, so only visible outputs are computed; where each output
  tile is a single site, a convolution gathers each site's receptive field (im2col); where the
  tiles are small, the layer runs densely on the zero canvas and its visible outputs are
  gathered;
* calls a kernel does not cover (transposed or ``padding="same"`` convolutions of even
  kernels, strides that leave the grid, ``ceil_mode`` pooling, ...) answer
  :data:`~.ops.ON_CANVAS`: the reference handler runs on the canvas (:func:`on_canvas`);
* global means over the spatial dims are means over the rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from ..norms import batch_norm_rows
from . import reference
from .ops import ON_CANVAS, adaptive_output_size, pair
from .rows import SparseMap

if TYPE_CHECKING:
    from .mode import FastSparseMode

__all__ = ["on_canvas", "conv", "max_pool", "adaptive_pool", "batch_norm", "group_norm", "instance_norm",
           "channel_norm", "channel_linear", "pad_on_canvas"]


def on_canvas(mode: FastSparseMode, handler, func, x, /, *args, fill: float = 0.0, **kwargs):
    """Run a reference ``handler`` on the dense canvas of ``x`` (``fill`` at masked sites) and
    gather the visible rows of its output."""
    dense = x.canvas(fill) if isinstance(x, SparseMap) else x
    out = handler(mode, func, dense, *args, **kwargs)
    if isinstance(out, (tuple, list)):
        return type(out)([mode.as_rows(out[0]), *out[1:]])
    return mode.as_rows(out)


def _on_rows_2d(x) -> bool:
    """Whether ``x`` is a channels-first ``(B, C, H, W)`` map held as rows."""
    return isinstance(x, SparseMap) and x.spatial_dim == 2 and x.rows.dim() == 3


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _output_factor(x: SparseMap, kernel, stride, padding, dilation) -> int | None:
    """Sites per patch side of a windowed layer's output, when it lies on the mask grid at
    ``factor / stride`` (equal strides dividing the factor, output size ``size / stride``); else None."""
    g = x.geometry
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho, wo = _output_size(g.height, kh, sh, ph, dh), _output_size(g.width, kw, sw, pw, dw)
    if sh != sw or g.factor % sh or ho * sh != g.height or wo * sw != g.width:
        return None
    return g.factor // sh


def _tiles(x: SparseMap, out_factor: int, stride: int, kernel, dilation, padding, fill: float,
           channels_last: bool = False) -> Tensor:
    """``(B*K, C, th, tw)`` input tiles (with halo) whose windows give the ``out_factor x
    out_factor`` outputs of each visible patch (``(B*K, th, tw, C)`` with ``channels_last``)."""
    g, rows = x.geometry, x.rows
    (kh, kw), (dh, dw), (ph, pw) = kernel, dilation, padding
    c = rows.shape[-1]
    th = (out_factor - 1) * stride + dh * (kh - 1) + 1
    tw = (out_factor - 1) * stride + dw * (kw - 1) + 1
    if ph == pw == 0 and th <= g.factor and tw <= g.factor:
        t = rows.view(g.batch * g.patches, g.factor, g.factor, c)[:, :th, :tw]
    else:
        hp = max(g.height + ph, (g.grid_height - 1) * g.factor + th)
        wp = max(g.width + pw, (g.grid_width - 1) * g.factor + tw)
        canvas = rows.new_full((g.batch * hp * wp, c), fill)
        canvas.index_copy_(0, g.padded_rows(hp, wp, ph, pw), rows.reshape(g.batch * g.rows_per_sample, c))
        t = canvas.index_select(0, g.tile_index(hp, wp, th, tw)).view(g.batch * g.patches, th, tw, c)
    return t if channels_last else t.permute(0, 3, 1, 2)


def _tiles_to_rows(out: Tensor, mode: FastSparseMode, out_factor: int) -> SparseMap:
    """Output tiles ``(B*K, C, f, f)`` as the rows of a map at ``out_factor``."""
    go = mode.geometry(out_factor)
    return SparseMap(out.permute(0, 2, 3, 1).reshape(go.batch, go.rows_per_sample, out.shape[1]), go, 2)


# -- convolution -------------------------------------------------------------------------------------
def _conv_parameters(args, kwargs) -> tuple:
    """``(weight, bias, stride, padding, dilation, groups)`` of an ``F.conv2d`` call."""
    names = ("weight", "bias", "stride", "padding", "dilation", "groups")
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kwargs.items() if k in names})
    return (vals["weight"], vals.get("bias"), vals.get("stride", 1), vals.get("padding", 0), vals.get("dilation", 1),
            vals.get("groups", 1))


def _explicit_padding(padding, kernel, dilation) -> tuple[int, int] | None:
    """Padding as numbers; None for ``"same"`` with an even window (asymmetric padding)."""
    if not isinstance(padding, str):
        return pair(padding)
    if padding == "valid":
        return (0, 0)
    (kh, kw), (dh, dw) = kernel, dilation
    if padding == "same" and (dh * (kh - 1)) % 2 == 0 and (dw * (kw - 1)) % 2 == 0:
        return (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    return None


def conv(mode: FastSparseMode, func, x, /, *args, **kwargs):
    """``F.conv2d`` at visible sites: 1x1 on the rows, im2col where each patch has one output
    site, halo tiles where the output tiles are large enough, the zero canvas where they are not."""
    x = mode.as_rows(x)
    w, b, stride, padding, dilation, groups = _conv_parameters(args, kwargs)
    if not _on_rows_2d(x) or w.dim() != 4:
        return ON_CANVAS
    kernel, stride, dilation = tuple(w.shape[-2:]), pair(stride), pair(dilation)
    padding = _explicit_padding(padding, kernel, dilation)
    fo = None if padding is None else _output_factor(x, kernel, stride, padding, dilation)
    if fo is None:
        return ON_CANVAS
    g, rows, sh = x.geometry, x.rows, stride[0]
    if kernel == (1, 1) and padding == (0, 0) and groups == 1:
        if sh > 1:
            rows = rows.view(g.batch, g.patches, g.factor, g.factor, -1)[:, :, ::sh, ::sh]
        return SparseMap(F.linear(rows.reshape(g.batch, -1, rows.shape[-1]), w.flatten(1), b), mode.geometry(fo), 2)
    depthwise = groups > 1 and groups == rows.shape[-1]
    if fo == 1 and groups == 1:
        # one output site per patch: gather each site's receptive field and multiply (im2col)
        cols = _tiles(x, 1, sh, kernel, dilation, padding, 0.0, channels_last=True)
        if cols.shape[1:3] != kernel:  # dilated: keep the kernel's taps only
            cols = cols[:, :: dilation[0], :: dilation[1]]
        out = F.linear(cols.reshape(g.batch, g.patches, -1), w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), b)
        return SparseMap(out, mode.geometry(1), 2)
    if fo < (4 if depthwise else mode.min_tile):
        # small tiles: the halo would cost more than computing the whole (zero) canvas
        return _dense_then_gather(mode, func, x, args, kwargs)
    tiles = _tiles(x, fo, sh, kernel, dilation, padding, 0.0)
    return _tiles_to_rows(F.conv2d(tiles, w, b, stride, 0, dilation, groups), mode, fo)


def _dense_then_gather(mode: FastSparseMode, func, x: SparseMap, args, kwargs):
    """Run ``func`` on the zero canvas and keep its visible outputs."""
    out = func(x.canvas(), *args, **kwargs)
    res = mode.as_rows(out)
    if not isinstance(res, SparseMap):
        mode.mask_output(out, func)  # raises for a map that left the grid
    return res


# -- pooling -----------------------------------------------------------------------------------------
def _pool_parameters(func, args, kwargs) -> tuple:
    """``(kernel, stride, padding, dilation, ceil_mode, return_indices)`` of any max-pool spelling."""
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kwargs.items() if k in names})
    k = vals["kernel_size"]
    s = vals.get("stride")
    if s is None or (isinstance(s, (tuple, list)) and len(s) == 0):
        s = k
    return (pair(k), pair(s), pair(vals.get("padding", 0)), pair(vals.get("dilation", 1)),
            bool(vals.get("ceil_mode", False)), bool(vals.get("return_indices", False)) or
            func is F.max_pool2d_with_indices)


def max_pool(mode: FastSparseMode, func, x, /, *args, **kwargs):
    """Max pooling on halo tiles read as ``-inf`` outside the visible sites."""
    x = mode.as_rows(x)
    kernel, stride, padding, dilation, ceil, indices = _pool_parameters(func, args, kwargs)
    if not _on_rows_2d(x) or ceil or indices:
        return ON_CANVAS
    fo = _output_factor(x, kernel, stride, padding, dilation)
    if fo is None or fo < mode.min_tile:
        return ON_CANVAS
    tiles = _tiles(x, fo, stride[0], kernel, dilation, padding, float("-inf"))
    return _tiles_to_rows(F.max_pool2d(tiles, kernel, stride, 0, dilation), mode, fo)


def adaptive_pool(mode: FastSparseMode, func, x, /, output_size, *args, **kwargs):
    """Pooling to 1x1: a mean (or maximum) over the rows."""
    x = mode.as_rows(x)
    if not isinstance(x, SparseMap) or x.spatial_dim != x.dim() - 2:
        return ON_CANVAS
    size = adaptive_output_size(output_size, x.shape)
    if size == tuple(x.shape[-2:]):
        return x
    if size != (1, 1) or args or kwargs.get("return_indices"):
        mode.fail(func, x, f"pools to {size}, which only has a sparse meaning for 1x1")
    r = x.rows.amax(1) if func is F.adaptive_max_pool2d else x.rows.mean(1)
    return r.reshape(*r.shape, 1, 1)


# -- norms -------------------------------------------------------------------------------------------
def _rows_2d(mode: FastSparseMode, func, x: SparseMap, what: str) -> Tensor:
    if not _on_rows_2d(x):
        mode.fail(func, x, f"is a {what} over a map that is not (B, C, H, W)")
    return x.rows


def batch_norm(mode: FastSparseMode, func, x, running_mean, running_var, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5):
    """Batch norm with the rows as the batch (of every rank, with a sync group)."""
    x = mode.as_rows(x)
    if not isinstance(x, SparseMap):
        return func(x, running_mean, running_var, weight, bias, training, momentum, eps)
    rows = _rows_2d(mode, func, x, "batch norm")
    b, n, c = rows.shape
    flat = rows.reshape(b * n, c)
    if training or running_mean is None:
        out = batch_norm_rows(flat, running_mean, running_var, weight, bias, True, momentum, eps, mode.sync_group)
    else:
        out = F.batch_norm(flat, running_mean, running_var, weight, bias, False, momentum or 0.0, eps)
    return x.with_rows(out.view(b, n, c))


def group_norm(mode: FastSparseMode, func, x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm over each sample's rows."""
    x = mode.as_rows(x)
    if not isinstance(x, SparseMap):
        return func(x, num_groups, weight, bias, eps)
    rows = _rows_2d(mode, func, x, "group norm")
    return x.with_rows(F.group_norm(rows.transpose(1, 2), num_groups, weight, bias, eps).transpose(1, 2))


def instance_norm(mode: FastSparseMode, func, x, running_mean=None, running_var=None, weight=None,
                  bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance norm over each sample's rows (a group norm with one channel per group)."""
    x = mode.as_rows(x)
    if not isinstance(x, SparseMap):
        return func(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    rows = _rows_2d(mode, func, x, "instance norm")
    if not use_input_stats:
        out = F.instance_norm(rows.transpose(1, 2).unsqueeze(-1), running_mean, running_var, weight, bias, False,
                              momentum, eps)
        return x.with_rows(out.squeeze(-1).transpose(1, 2))
    if running_mean is not None:
        mode.fail(func, x, "is an instance norm with running statistics, which is not supported")
    return x.with_rows(F.group_norm(rows.transpose(1, 2), rows.shape[2], weight, bias, eps).transpose(1, 2))


def _trailing_channels(x: SparseMap) -> int:
    return x.dim() - (x.spatial_dim + 2)


def channel_norm(mode: FastSparseMode, func, x, /, normalized_shape, *args, **kwargs):
    """LayerNorm / RMSNorm over trailing channel dims: on the rows."""
    if not isinstance(x, SparseMap):
        return reference.channel_norm(mode, func, x, normalized_shape, *args, **kwargs)
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    if n > _trailing_channels(x):
        mode.fail(func, x, "normalises over spatial dims")
    return x.with_rows(func(x.rows, normalized_shape, *args, **kwargs))


def channel_linear(mode: FastSparseMode, func, x, /, *args, **kwargs):
    """Linear over the last (channel) dim: on the rows."""
    if not isinstance(x, SparseMap):
        return reference.channel_linear(mode, func, x, *args, **kwargs)
    if _trailing_channels(x) < 1:
        mode.fail(func, x, "mixes the width dim of a channels-first map")
    return x.with_rows(func(x.rows, *args, **kwargs))


def pad_on_canvas(mode: FastSparseMode, func, x, /, *args, **kwargs):
    """Padding: the zero canvas, padded (a dense map off the grid, for the next layer to read)."""
    return func(x.canvas() if isinstance(x, SparseMap) else mode.mask_input(x), *args, **kwargs)
