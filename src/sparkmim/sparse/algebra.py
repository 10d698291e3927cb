"""The fast form's tensor algebra: shape, index, split, join and reduction ops translated onto rows.

A :class:`~.rows.SparseMap` of logical shape ``(B, *c_before, H, W, *c_after)`` holds rows
``(B, n, *c_before, *c_after)``. An operation on its channel dims becomes the same operation on
the matching rows dims (:meth:`~.rows.SparseMap.rows_dim`); an operation that would move, split
or mix the batch or spatial dims is refused, as the reference form refuses it. A reduction over
both spatial dims is a reduction over the rows (the visible sites) and gives a dense result.

Each translation takes ``(mode, func, name, args, kwargs)``; :data:`ON_ROWS` maps every
:class:`~.ops.OpKind` to its translation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .ops import (
    MASKED_REDUCTIONS,
    METADATA_PROPERTIES,
    ONE_DIM_REDUCTIONS,
    SCANS,
    OpKind,
    is_inplace,
    reduced_dims,
    take_reduction_dim,
    tensors,
)
from .rows import SparseMap, meta_like, replace_maps, to_rows

if TYPE_CHECKING:
    from .mode import FastSparseMode

__all__ = ["ON_ROWS", "per_site", "reshape", "permute", "split", "slice_channels", "getitem", "join", "reduce"]


def _first_map(args, kwargs) -> SparseMap:
    return next(tensors(args, kwargs, SparseMap))


def _channel_rows_dim(mode: FastSparseMode, func, x: SparseMap, dim: int) -> int:
    """The rows dim of logical channel dim ``dim``; refused for the batch or a spatial dim."""
    r = x.rows_dim(dim)
    if r < 2:
        mode.fail(func, x, f"splits or indexes the batch or spatial dims (dim {dim})")
    return r


def _drops_dim_before_space(x: SparseMap, dim: int) -> int:
    """``spatial_dim`` after logical dim ``dim`` is removed."""
    return x.spatial_dim - 1 if (dim % x.dim()) < x.spatial_dim else x.spatial_dim


# -- metadata and per-site ops -------------------------------------------------------------------
def metadata(mode: FastSparseMode, func, name: str, args, kwargs):
    """Sizes, strides, flags: answered from the logical shape."""
    return func(*args, **kwargs)


def read_property(mode: FastSparseMode, func, name: str, args, kwargs):
    """Attribute reads: shape and metadata from the map, ``.data`` as a map of the rows' data."""
    prop = getattr(getattr(func, "__self__", None), "__name__", None)
    if prop in METADATA_PROPERTIES:
        return func(*args, **kwargs)
    if prop == "data":
        return args[0].with_rows(args[0].rows.data)
    mode.fail(func, args[0], f"reads the property '{prop}' of a sparse map")


def create_dense(mode: FastSparseMode, func, name: str, args, kwargs):
    """``new_*``: a fresh dense tensor with the rows' dtype and device."""
    return func(args[0].rows, *args[1:], **kwargs)


def like(mode: FastSparseMode, func, name: str, args, kwargs):
    """``*_like``: a fresh map with the same rows shape."""
    lead = _first_map(args, kwargs)
    return lead.with_rows(func(lead.rows, *args[1:], **kwargs))


def keep_layout(mode: FastSparseMode, func, name: str, args, kwargs):
    """``contiguous``: rows have no memory format to change."""
    return args[0]


def move(mode: FastSparseMode, func, name: str, args, kwargs):
    """``to``: dtype and device apply to the rows; the memory format has no meaning for rows."""
    kwargs.pop("memory_format", None)
    x = args[0]
    rest = [a.rows if isinstance(a, SparseMap) else a for a in args[1:]]
    return x.with_rows(x.rows.to(*rest, **kwargs)) if rest or kwargs else x


def per_site(mode: FastSparseMode, func, name: str, args, kwargs):
    """Elementwise ops on the rows of maps of one layout; dense operands are broadcast to rows."""
    maps = list(tensors(args, kwargs, SparseMap))
    lead = maps[0]
    for m in maps[1:]:
        if m.geometry is not lead.geometry or m.spatial_dim != lead.spatial_dim or m.dim() != lead.dim():
            mode.fail(func, m, f"combines sparse maps of different layouts {tuple(lead.shape)} and {tuple(m.shape)}")
    shapes = [a.shape for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    try:
        logical = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        mode.fail(func, lead, "broadcasts tensors of incompatible shapes")
    if len(logical) != lead.dim():
        mode.fail(func, lead, f"broadcasts a sparse map to {tuple(logical)}")

    def on_rows(a):
        if isinstance(a, SparseMap):
            return a.rows
        if isinstance(a, Tensor) and a.dim() > 0:
            return dense_as_rows(a, lead, logical)
        return a

    inplace = is_inplace(name)
    if inplace and not isinstance(args[0], SparseMap):
        mode.fail(func, lead, "writes a sparse map into a dense tensor in place")
    out = func(*[on_rows(a) for a in args], **{k: on_rows(v) for k, v in kwargs.items()})
    if inplace:
        return args[0]
    if isinstance(out, Tensor) and out.dim() == lead.rows.dim() and out.shape[:2] == lead.rows.shape[:2]:
        return lead.with_rows(out)
    if isinstance(out, Tensor):
        mode.fail(func, lead, f"gives a result of unexpected shape {tuple(out.shape)}")
    return out


def dense_as_rows(a: Tensor, lead: SparseMap, logical) -> Tensor:
    """A dense operand of a per-site op in the rows layout of ``lead`` (broadcastable)."""
    nd = len(logical)
    a = a.reshape((1,) * (nd - a.dim()) + tuple(a.shape))
    s = lead.spatial_dim
    chans = [d for d in range(1, nd) if d not in (s, s + 1)]
    if a.shape[s] == 1 and a.shape[s + 1] == 1:
        return a.permute(0, s, *chans, s + 1).squeeze(-1)
    full = list(a.shape)
    g = lead.geometry
    full[0], full[s], full[s + 1] = g.batch, g.height, g.width
    return to_rows(a.expand(full), g, s).rows


# -- shapes ------------------------------------------------------------------------------------------
def reshape(mode: FastSparseMode, func, name: str, args, kwargs):
    """Views, reshapes and broadcasts that keep ``(B, ..., H, W, ...)`` with the same channels
    before the spatial dims; a dense operand of ``expand_as`` (a gate) is broadcast to rows."""
    x = args[0]
    if not isinstance(x, SparseMap):
        target = _first_map(args, kwargs)
        if name == "expand_as" and x.dim() <= target.dim():  # a broadcast operand, e.g. gates
            rows = dense_as_rows(x, target, tuple(target.shape))
            return target.with_rows(rows.expand(target.rows.shape[:2] + rows.shape[2:]))
        mode.fail(func, target, "reshapes a dense tensor to a sparse map's shape")
    new = tuple(func(*[replace_maps(a, meta_like) for a in args],
                     **{k: replace_maps(v, meta_like) for k, v in kwargs.items()}).shape)
    g = x.geometry
    before = math.prod(x.shape[1: x.spatial_dim])
    for j in range(1, len(new) - 1):
        if new[j: j + 2] == (g.height, g.width) and new[0] == g.batch and math.prod(new[1:j]) == before:
            chans = (*new[1:j], *new[j + 2:])
            if name in ("expand", "expand_as", "broadcast_to"):
                rows = x.rows.expand(g.batch, g.rows_per_sample, *chans)
            else:
                rows = x.rows.reshape(g.batch, g.rows_per_sample, *chans)
            return SparseMap(rows, g, j)
    mode.fail(func, x, f"rearranges the spatial dims (result {new})")


def permute(mode: FastSparseMode, func, name: str, args, kwargs):
    """Permutations that keep the batch dim first and H, W adjacent and in order."""
    x = args[0]
    out = func(meta_like(x, distinct_strides=True), *args[1:], **kwargs)
    perm = [int(math.log2(s)) for s in out.stride()]
    s = x.spatial_dim
    if perm[0] != 0 or s not in perm:
        mode.fail(func, x, f"moves the batch or spatial dims (permutation {perm})")
    j = perm.index(s)
    if j + 1 >= len(perm) or perm[j + 1] != s + 1:
        mode.fail(func, x, f"separates the spatial dims (permutation {perm})")
    chans = [x.rows_dim(p) for i, p in enumerate(perm) if i not in (0, j, j + 1)]
    return SparseMap(x.rows.permute(0, 1, *chans), x.geometry, j)


def split(mode: FastSparseMode, func, name: str, args, kwargs):
    """``split``, ``split_with_sizes``, ``chunk``, ``tensor_split``, ``unbind`` along a channel dim."""
    x = args[0]
    dim = kwargs.pop("dim", None)
    rest = list(args[1:])
    if dim is None:
        if name == "unbind":
            dim = rest.pop(0) if rest else 0
        else:
            dim = rest.pop(1) if len(rest) > 1 else 0
    r = _channel_rows_dim(mode, func, x, dim)
    if name == "unbind":
        spatial_dim = _drops_dim_before_space(x, dim)
        return tuple(SparseMap(p, x.geometry, spatial_dim) for p in func(x.rows, r))
    return tuple(x.with_rows(p) for p in func(x.rows, *rest, dim=r, **kwargs))


def slice_channels(mode: FastSparseMode, func, name: str, args, kwargs):
    """``narrow`` and ``select`` along a channel dim."""
    x = args[0]
    dim = kwargs.get("dim", args[1])
    r = _channel_rows_dim(mode, func, x, dim)
    if name == "narrow":
        return x.with_rows(x.rows.narrow(r, *args[2:]))
    return SparseMap(x.rows.select(r, *args[2:]), x.geometry, _drops_dim_before_space(x, dim))


def getitem(mode: FastSparseMode, func, name: str, args, kwargs):
    """Indexing with full slices on the batch and spatial dims and slices or ints on channel dims
    (``Ellipsis`` expanded)."""
    x, index = args[0], args[1]
    if not isinstance(x, SparseMap):
        mode.fail(func, _first_map((index,), {}), "indexes with a sparse map")
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        items[k: k + 1] = [slice(None)] * (x.dim() - len(items) + 1)
    items += [slice(None)] * (x.dim() - len(items))
    rows_index: list = [slice(None), slice(None)]
    spatial_dim = x.spatial_dim
    for d, it in enumerate(items):
        if d == 0 or d in (x.spatial_dim, x.spatial_dim + 1):
            if not (isinstance(it, slice) and it == slice(None)):
                mode.fail(func, x, f"indexes the batch or spatial dims ({index!r})")
            continue
        if not isinstance(it, (slice, int)):
            mode.fail(func, x, f"indexes a sparse map with {type(it).__name__}")
        rows_index.append(it)
        if isinstance(it, int) and d < x.spatial_dim:
            spatial_dim -= 1
    return SparseMap(x.rows[tuple(rows_index)], x.geometry, spatial_dim)


def join(mode: FastSparseMode, func, name: str, args, kwargs):
    """``cat`` along a channel dim, ``stack`` along a new dim other than the batch dim, of maps of
    one layout (dense maps on the grid are gathered first)."""
    seq = list(args[0])
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    lead = next(t for t in seq if isinstance(t, SparseMap))
    seq = [mode.as_rows(t) for t in seq]
    for t in seq:
        if not isinstance(t, SparseMap) or t.geometry is not lead.geometry or t.spatial_dim != lead.spatial_dim:
            mode.fail(func, lead, "concatenates a sparse map with a tensor of another layout")
    if name != "stack":
        return lead.with_rows(torch.cat([t.rows for t in seq], _channel_rows_dim(mode, func, lead, dim)))
    d = dim % (lead.dim() + 1)
    if d == 0:
        mode.fail(func, lead, "stacks sparse maps along the batch dim")
    before = d <= lead.spatial_dim
    r = d + 1 if before else d - 1
    return SparseMap(torch.stack([t.rows for t in seq], r), lead.geometry, lead.spatial_dim + 1 if before
                     else lead.spatial_dim)


# -- reductions --------------------------------------------------------------------------------------
def reduce(mode: FastSparseMode, func, name: str, args, kwargs):
    """Reductions over channel dims stay maps (one dim fewer unless ``keepdim``); over both
    spatial dims (mean, sum, max, norm, ... only) they reduce the rows and give a dense tensor;
    scans and softmax along a channel dim keep the map."""
    x, rest = args[0], list(args[1:])
    if not isinstance(x, SparseMap):
        mode.fail(func, _first_map(args, kwargs), "is not known to have a sparse meaning")
    if name in ("max", "min") and rest and isinstance(rest[0], Tensor):
        return per_site(mode, func, name, args, kwargs)
    kwargs = dict(kwargs)
    dims = reduced_dims(take_reduction_dim(name, rest, kwargs), x.dim())
    over_space = _covers_space(mode, func, name, x, dims)
    keepdim = kwargs.pop("keepdim", False)
    position = 1 if name in ("norm", "vector_norm") else 0
    if len(rest) > position and isinstance(rest[position], bool):
        keepdim = rest.pop(position)
    rows_dims = sorted({x.rows_dim(d) for d in dims})
    if name not in ONE_DIM_REDUCTIONS:
        if name == "norm" and not rest and "p" not in kwargs:
            rest = [2]
        out = func(x.rows, *rest, dim=rows_dims, keepdim=True, **kwargs)
        if over_space:
            return _spatial_result(x, out, dims, keepdim)
        if isinstance(out, tuple):  # std_mean, var_mean
            return type(out)(_over_channels(x, x.with_rows(o), dims, keepdim) for o in out)
        return _over_channels(x, x.with_rows(out), dims, keepdim)
    if len(rows_dims) != 1:
        mode.fail(func, x, f"reduces with '{name}' over several dims")
    if name in SCANS:
        return x.with_rows(func(x.rows, rows_dims[0], *rest, **kwargs))
    out = func(x.rows, *rest, dim=rows_dims[0], keepdim=keepdim, **kwargs)
    if over_space:
        return _spatial_result(x, out[0] if isinstance(out, tuple) else out, dims, keepdim)
    spatial_dim = x.spatial_dim - sum(1 for d in dims if d < x.spatial_dim and not keepdim)
    if isinstance(out, tuple):  # (values, indices)
        return type(out)((SparseMap(out[0], x.geometry, spatial_dim), SparseMap(out[1], x.geometry, spatial_dim)))
    return SparseMap(out, x.geometry, spatial_dim)


def _covers_space(mode: FastSparseMode, func, name: str, x: SparseMap, dims) -> bool:
    """Whether a reduction over ``dims`` covers the spatial dims (both: only for a reduction with
    a masked meaning); refused for one of them."""
    spatial = {x.spatial_dim, x.spatial_dim + 1}
    if not spatial & set(dims):
        return False
    if not spatial <= set(dims):
        mode.fail(func, x, f"reduces over part of the spatial dims (dims {list(dims)})")
    if name not in MASKED_REDUCTIONS:
        mode.fail(func, x, f"reduces over the spatial dims with '{name}', which has no masked form here")
    return True


def _over_channels(x: SparseMap, kept: SparseMap, dims, keepdim: bool) -> SparseMap:
    """A reduction over channel dims computed with ``keepdim``: the reduced dims dropped unless asked."""
    if keepdim:
        return kept
    rows = kept.rows
    for r in sorted((x.rows_dim(d) for d in dims), reverse=True):
        rows = rows.squeeze(r)
    return SparseMap(rows, x.geometry, x.spatial_dim - sum(1 for d in dims if d < x.spatial_dim))


def _spatial_result(x: SparseMap, values: Tensor, dims, keepdim: bool) -> Tensor:
    """A reduction over the rows (and maybe channels), computed with ``keepdim``, as the dense
    tensor of the shape the reduction of the logical map gives."""
    shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
    if not keepdim:
        shape = [s for d, s in enumerate(shape) if d not in dims]
    v = values.unsqueeze(2)  # (b, 1, 1, *chans) in rows order
    nb = x.spatial_dim - 1
    v = v.permute(0, *range(3, 3 + nb), 1, 2, *range(3 + nb, v.dim()))
    return v.reshape(shape)


def _refuse(mode: FastSparseMode, func, name: str, args, kwargs):
    mode.fail(func, _first_map(args, kwargs), "is not known to have a sparse meaning")


ON_ROWS: Mapping[OpKind, object] = MappingProxyType({
    OpKind.METADATA: metadata,
    OpKind.PROPERTY: read_property,
    OpKind.ELEMENTWISE: per_site,
    OpKind.CREATE: create_dense,
    OpKind.LIKE: like,
    OpKind.LAYOUT: keep_layout,
    OpKind.MOVE: move,
    OpKind.BROADCAST: reshape,
    OpKind.RESHAPE: reshape,
    OpKind.PERMUTE: permute,
    OpKind.SPLIT: split,
    OpKind.SLICE: slice_channels,
    OpKind.INDEX: getitem,
    OpKind.JOIN: join,
    OpKind.REDUCTION: reduce,
})
"""The fast form's translation of each op kind onto rows (ops of no kind are refused)."""
