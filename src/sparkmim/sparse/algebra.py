"""The fast form's tensor algebra: shape, index, split, join and reduction ops on tiles.

A :class:`~.tiles.SparseMap` of logical shape ``(B, *c_before, *spatial, *c_after)`` holds tiles
``(B*K, *c_before, *factors, *c_after)``: the same dims, so an operation on its channel dims is
the same operation, with the same dims, on the tiles. An operation that would move, split or mix
the batch or spatial dims is refused, as the reference form refuses it. A reduction over all
spatial dims is a reduction over each sample's tiles (the visible sites) and gives a dense result.

Each translation takes ``(ctx, func, name, args, kwargs)``; :data:`ON_TILES` maps every
:class:`~.ops.OpKind` to its translation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor

from .context import FastContext
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
from .tiles import SparseMap, meta_like, replace_maps, to_tiles

__all__ = ["ON_TILES", "per_site", "reshape", "permute", "split", "slice_channels", "getitem", "join", "reduce"]


def _first_map(args, kwargs) -> SparseMap:
    return next(tensors(args, kwargs, SparseMap))


def _spatial(x: SparseMap) -> range:
    """The logical (and tiles) dims of ``x``'s spatial axes."""
    return range(x.spatial_dim, x.spatial_dim + x.geometry.spatial_dims)


def _channel_dim(ctx: FastContext, func, x: SparseMap, dim: int) -> int:
    """Logical (and tiles) dim ``dim``, non-negative; refused for the batch or a spatial dim."""
    d = dim % x.dim()
    if d == 0 or d in _spatial(x):
        ctx.fail(func, x, f"splits or indexes the batch or spatial dims (dim {dim})")
    return d


def _drops_dim_before_space(x: SparseMap, dim: int) -> int:
    """``spatial_dim`` after logical dim ``dim`` is removed."""
    return x.spatial_dim - 1 if (dim % x.dim()) < x.spatial_dim else x.spatial_dim


def _tiles_of(a):
    return a.tiles if isinstance(a, SparseMap) else a


# -- metadata and per-site ops -------------------------------------------------------------------
def metadata(ctx: FastContext, func, name: str, args, kwargs):
    """Sizes, strides, flags: answered from the logical shape."""
    return func(*args, **kwargs)


def read_property(ctx: FastContext, func, name: str, args, kwargs):
    """Attribute reads: shape and metadata from the map, ``.data`` as a map of the tiles' data."""
    prop = getattr(getattr(func, "__self__", None), "__name__", None)
    if prop in METADATA_PROPERTIES:
        return func(*args, **kwargs)
    if prop == "data":
        return args[0].with_tiles(args[0].tiles.data)
    ctx.fail(func, args[0], f"reads the property '{prop}' of a sparse map")


def create_dense(ctx: FastContext, func, name: str, args, kwargs):
    """``new_*``: a fresh dense tensor with the tiles' dtype and device."""
    return func(args[0].tiles, *args[1:], **kwargs)


def like(ctx: FastContext, func, name: str, args, kwargs):
    """``*_like``: a fresh map with the same tiles shape."""
    lead = _first_map(args, kwargs)
    return lead.with_tiles(func(lead.tiles, *args[1:], **kwargs))


def on_tiles(ctx: FastContext, func, name: str, args, kwargs):
    """``contiguous`` and ``to``: the same call on the tiles (a memory format applies to them)."""
    x = args[0]
    return x.with_tiles(func(x.tiles, *[_tiles_of(a) for a in args[1:]], **kwargs))


def per_site(ctx: FastContext, func, name: str, args, kwargs):
    """Elementwise ops on the tiles of maps of one layout; dense operands are broadcast to tiles."""
    maps = list(tensors(args, kwargs, SparseMap))
    lead = maps[0]
    for m in maps[1:]:
        if m.geometry is not lead.geometry or m.spatial_dim != lead.spatial_dim or m.dim() != lead.dim():
            ctx.fail(func, m, f"combines sparse maps of different layouts {tuple(lead.shape)} and {tuple(m.shape)}")
    shapes = [a.shape for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    try:
        logical = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        ctx.fail(func, lead, "broadcasts tensors of incompatible shapes")
    if len(logical) != lead.dim():
        ctx.fail(func, lead, f"broadcasts a sparse map to {tuple(logical)}")

    def as_tiles(a):
        if isinstance(a, SparseMap):
            return a.tiles
        if isinstance(a, Tensor) and a.dim() > 0:
            return dense_as_tiles(a, lead, logical)
        return a

    inplace = is_inplace(name)
    if inplace and not isinstance(args[0], SparseMap):
        ctx.fail(func, lead, "writes a sparse map into a dense tensor in place")
    out = func(*[as_tiles(a) for a in args], **{k: as_tiles(v) for k, v in kwargs.items()})
    if inplace:
        return args[0]
    t = lead.tiles
    space = slice(lead.spatial_dim, lead.spatial_dim + lead.geometry.spatial_dims)
    if isinstance(out, Tensor) and out.dim() == t.dim() and out.shape[0] == t.shape[0] \
            and out.shape[space] == t.shape[space]:
        return lead.with_tiles(out)
    if isinstance(out, Tensor):
        ctx.fail(func, lead, f"gives a result of unexpected shape {tuple(out.shape)}")
    return out


def dense_as_tiles(a: Tensor, lead: SparseMap, logical) -> Tensor:
    """A dense operand of a per-site op in the tiles layout of ``lead`` (broadcastable): as it is
    when it is constant over samples and sites, repeated per tile when it varies by sample only,
    else its tiles."""
    nd = len(logical)
    if a.dim() < nd:  # (no view when it has the dims already: one operation fewer per call)
        a = a.reshape((1,) * (nd - a.dim()) + tuple(a.shape))
    s, g = lead.spatial_dim, lead.geometry
    if all(a.shape[d] == 1 for d in _spatial(lead)):
        if a.shape[0] == 1:
            return a
        return a.repeat_interleave(g.tiles // g.batch, dim=0)
    full = list(a.shape)
    full[0] = g.batch
    full[s: s + g.spatial_dims] = g.sizes
    return to_tiles(a.expand(full), g, s).tiles


# -- shapes ------------------------------------------------------------------------------------------
def reshape(ctx: FastContext, func, name: str, args, kwargs):
    """Views, reshapes and broadcasts that keep ``(B, ..., *spatial, ...)`` with the same channels
    before the spatial dims; a dense operand of ``expand_as`` (a gate) is broadcast to tiles."""
    x = args[0]
    if not isinstance(x, SparseMap):
        target = _first_map(args, kwargs)
        if name == "expand_as" and x.dim() <= target.dim():  # a broadcast operand, e.g. gates
            t = dense_as_tiles(x, target, tuple(target.shape))
            return target.with_tiles(t.expand(target.tiles.shape))
        ctx.fail(func, target, "reshapes a dense tensor to a sparse map's shape")
    new = tuple(func(*[replace_maps(a, meta_like) for a in args],
                     **{k: replace_maps(v, meta_like) for k, v in kwargs.items()}).shape)
    g = x.geometry
    n = g.spatial_dims
    before = math.prod(x.shape[1: x.spatial_dim])
    for j in range(1, len(new) - n + 1):
        if new[j: j + n] == g.sizes and new[0] == g.batch and math.prod(new[1:j]) == before:
            shape = (g.tiles, *new[1:j], *g.factors, *new[j + n:])
            if name in ("expand", "expand_as", "broadcast_to"):
                return SparseMap(x.tiles.expand(shape), g, j)
            return SparseMap(x.tiles.reshape(shape), g, j)
    ctx.fail(func, x, f"rearranges the spatial dims (result {new})")


def permute(ctx: FastContext, func, name: str, args, kwargs):
    """Permutations that keep the batch dim first and the spatial dims adjacent and in order."""
    x = args[0]
    perm = _permutation(func, name, x, args, kwargs)
    s = x.spatial_dim
    if perm[0] != 0 or s not in perm:
        ctx.fail(func, x, f"moves the batch or spatial dims (permutation {perm})")
    j = perm.index(s)
    if perm[j: j + x.geometry.spatial_dims] != list(_spatial(x)):
        ctx.fail(func, x, f"separates the spatial dims (permutation {perm})")
    return SparseMap(x.tiles.permute(perm), x.geometry, j)


def _permutation(func, name: str, x: SparseMap, args, kwargs) -> list[int]:
    """The dim order a permute-kind op gives: read from its arguments for ``permute`` and
    ``transpose``, else from the strides of the op applied to a meta tensor."""
    n = x.dim()
    rest = list(args[1:]) + [kwargs[k] for k in ("dims", "dim0", "dim1") if k in kwargs]
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if len(dims) == n and all(isinstance(d, int) for d in dims):
            return [d % n for d in dims]
    elif name in ("transpose", "swapaxes", "swapdims") and len(rest) == 2 and all(isinstance(d, int) for d in rest):
        perm = list(range(n))
        a, b = rest[0] % n, rest[1] % n
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    out = func(meta_like(x, distinct_strides=True), *args[1:], **kwargs)
    return [int(math.log2(st)) for st in out.stride()]


def split(ctx: FastContext, func, name: str, args, kwargs):
    """``split``, ``split_with_sizes``, ``chunk``, ``tensor_split``, ``unbind`` along a channel dim."""
    x = args[0]
    dim = kwargs.pop("dim", None)
    rest = list(args[1:])
    if dim is None:
        if name == "unbind":
            dim = rest.pop(0) if rest else 0
        else:
            dim = rest.pop(1) if len(rest) > 1 else 0
    d = _channel_dim(ctx, func, x, dim)
    if name == "unbind":
        spatial_dim = _drops_dim_before_space(x, d)
        return tuple(SparseMap(p, x.geometry, spatial_dim) for p in func(x.tiles, d))
    return tuple(x.with_tiles(p) for p in func(x.tiles, *rest, dim=d, **kwargs))


def slice_channels(ctx: FastContext, func, name: str, args, kwargs):
    """``narrow`` and ``select`` along a channel dim."""
    x = args[0]
    dim = kwargs.get("dim", args[1])
    d = _channel_dim(ctx, func, x, dim)
    if name == "narrow":
        return x.with_tiles(x.tiles.narrow(d, *args[2:]))
    return SparseMap(x.tiles.select(d, *args[2:]), x.geometry, _drops_dim_before_space(x, d))


def getitem(ctx: FastContext, func, name: str, args, kwargs):
    """Indexing with full slices on the batch and spatial dims and slices or ints on channel dims
    (``Ellipsis`` expanded): the same index on the tiles."""
    x, index = args[0], args[1]
    if not isinstance(x, SparseMap):
        ctx.fail(func, _first_map((index,), {}), "indexes with a sparse map")
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        items[k: k + 1] = [slice(None)] * (x.dim() - len(items) + 1)
    items += [slice(None)] * (x.dim() - len(items))
    spatial_dim = x.spatial_dim
    for d, it in enumerate(items):
        if d == 0 or d in _spatial(x):
            if not (isinstance(it, slice) and it == slice(None)):
                ctx.fail(func, x, f"indexes the batch or spatial dims ({index!r})")
            continue
        if not isinstance(it, (slice, int)):
            ctx.fail(func, x, f"indexes a sparse map with {type(it).__name__}")
        if isinstance(it, int) and d < x.spatial_dim:
            spatial_dim -= 1
    return SparseMap(x.tiles[tuple(items)], x.geometry, spatial_dim)


def join(ctx: FastContext, func, name: str, args, kwargs):
    """``cat`` along a channel dim, ``stack`` along a new dim other than the batch dim, of maps of
    one layout (dense maps on the grid are gathered first)."""
    seq = list(args[0])
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    lead = next(t for t in seq if isinstance(t, SparseMap))
    seq = [ctx.as_tiles(t) for t in seq]
    for t in seq:
        if not isinstance(t, SparseMap) or t.geometry is not lead.geometry or t.spatial_dim != lead.spatial_dim:
            ctx.fail(func, lead, "concatenates a sparse map with a tensor of another layout")
    if name != "stack":
        return lead.with_tiles(torch.cat([t.tiles for t in seq], _channel_dim(ctx, func, lead, dim)))
    d = dim % (lead.dim() + 1)
    if d == 0:
        ctx.fail(func, lead, "stacks sparse maps along the batch dim")
    return SparseMap(torch.stack([t.tiles for t in seq], d), lead.geometry,
                     lead.spatial_dim + 1 if d <= lead.spatial_dim else lead.spatial_dim)


# -- reductions --------------------------------------------------------------------------------------
def reduce(ctx: FastContext, func, name: str, args, kwargs):
    """Reductions over channel dims are the same reduction of the tiles (a map, one dim fewer
    unless ``keepdim``); over all spatial dims (mean, sum, max, norm, ... only) they reduce each
    sample's tiles and give a dense tensor; scans and softmax along a channel dim keep the map."""
    x, rest = args[0], list(args[1:])
    if not isinstance(x, SparseMap):
        ctx.fail(func, _first_map(args, kwargs), "is not known to have a sparse meaning")
    if name in ("max", "min") and rest and isinstance(rest[0], Tensor):
        return per_site(ctx, func, name, args, kwargs)
    parsed = dict(kwargs)
    dims = reduced_dims(take_reduction_dim(name, rest, parsed), x.dim())
    keepdim = parsed.pop("keepdim", False)
    position = 1 if name in ("norm", "vector_norm") else 0
    if len(rest) > position and isinstance(rest[position], bool):
        keepdim = rest.pop(position)
    if _covers_space(ctx, func, name, x, dims):
        return _over_space(x, func, name, rest, parsed, dims, keepdim)
    if name in ONE_DIM_REDUCTIONS and len(dims) != 1:
        ctx.fail(func, x, f"reduces with '{name}' over several dims")
    out = func(x.tiles, *args[1:], **kwargs)
    if name in SCANS:
        return x.with_tiles(out)
    spatial_dim = x.spatial_dim - (0 if keepdim else sum(1 for d in dims if d < x.spatial_dim))
    if isinstance(out, tuple):  # (values, indices), std_mean, var_mean
        return type(out)(SparseMap(o, x.geometry, spatial_dim) for o in out)
    return SparseMap(out, x.geometry, spatial_dim)


def _covers_space(ctx: FastContext, func, name: str, x: SparseMap, dims) -> bool:
    """Whether a reduction over ``dims`` covers the spatial dims (all: only for a reduction with
    a masked meaning); refused for some of them."""
    spatial = set(_spatial(x))
    if not spatial & set(dims):
        return False
    if not spatial <= set(dims):
        ctx.fail(func, x, f"reduces over part of the spatial dims (dims {list(dims)})")
    if name not in MASKED_REDUCTIONS:
        ctx.fail(func, x, f"reduces over the spatial dims with '{name}', which has no masked form here")
    return True


def _over_space(x: SparseMap, func, name: str, rest: list, kwargs: dict, dims, keepdim: bool) -> Tensor:
    """A reduction over the visible sites (and maybe the batch and channels): over each sample's
    tiles viewed ``(B, K, ...)``; the dense result has the shape the logical map's reduction gives."""
    g = x.geometry
    t = x.tiles.view(g.batch, g.tiles // g.batch, *x.tiles.shape[1:])
    over = [1] + [d + 1 for d in dims if d != 0] + ([0] if 0 in dims else [])
    if name in ("max", "min"):  # over several dims: the values only, as amax / amin
        out = (t.amax if name == "max" else t.amin)(dim=sorted(over), keepdim=True)
    else:
        if name == "norm" and not rest and "p" not in kwargs:
            rest = [2]
        out = func(t, *rest, dim=sorted(over), keepdim=True, **kwargs)
    shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
    if not keepdim:
        shape = [s for d, s in enumerate(shape) if d not in dims]
    return out.reshape(shape)


ON_TILES: Mapping[OpKind, object] = MappingProxyType({
    OpKind.METADATA: metadata,
    OpKind.PROPERTY: read_property,
    OpKind.ELEMENTWISE: per_site,
    OpKind.CREATE: create_dense,
    OpKind.LIKE: like,
    OpKind.LAYOUT: on_tiles,
    OpKind.MOVE: on_tiles,
    OpKind.BROADCAST: reshape,
    OpKind.RESHAPE: reshape,
    OpKind.PERMUTE: permute,
    OpKind.SPLIT: split,
    OpKind.SLICE: slice_channels,
    OpKind.INDEX: getitem,
    OpKind.JOIN: join,
    OpKind.REDUCTION: reduce,
})
"""The fast form's translation of each op kind onto tiles (ops of no kind are refused)."""
