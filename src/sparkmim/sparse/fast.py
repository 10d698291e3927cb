"""Fast sparse semantics: feature maps hold their visible sites only.

:class:`FastSparseMode` gives the model the same meaning as the reference
:class:`~sparkmim.sparse.semantics.SparseMode` (masked sites are absent), but instead of running
every layer densely and masking the result, a feature map on the mask grid is a
:class:`SparseMap`: a tensor that reports the map's full logical shape to the model while it
stores only the rows of its visible sites, ``rows`` of shape ``(B, n, *channels)``.

Every sample keeps the same number ``K`` of visible patches, so at a map of ``f x f`` sites per
patch each sample has exactly ``n = K * f * f`` rows: all shapes are static, and the index
tensors are built once per batch on the mask's device without host synchronisation. Rows are
ordered patch by patch (ascending patch index), row-major within a patch, so the rows of one
sample form ``K`` tiles of ``f x f`` sites.

What runs where:

* per-site work (activations, arithmetic, casts, channel rearrangements, ``Linear`` and
  ``LayerNorm`` on channels-last maps, 1x1 convolutions) runs on the rows;
* batch norm takes its statistics from the rows directly; group and instance norm use a
  per-sample view of them;
* spatial layers (convolutions, max pooling) run on the visible tiles with a halo gathered
  from a zero (or ``-inf``) canvas, so only visible outputs are computed; where the output
  tiles are a single site, the layer runs densely on the zero canvas and its visible outputs
  are gathered;
* rarely used spatial layers (average pooling, interpolation, transposed convolutions,
  padding) run through the reference handler on the canvas;
* global means over the spatial dims are means over the rows.

Anything the reference mode refuses is refused here too, with the same error type.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masking import MaskPyramid
from . import semantics as ref
from .semantics import SparseMode, SparseSemanticsError, batch_norm_rows

__all__ = ["FastSparseMode", "SparseMap", "supports_fast", "to_dense"]


def supports_fast(masks: MaskPyramid) -> bool:
    """The fast form needs the same number of visible patches in every sample."""
    return masks.keep is not None


class _Geometry:
    """Where the rows of a map with ``factor x factor`` sites per patch sit, for one batch."""

    def __init__(self, masks: MaskPyramid, factor: int):
        self.masks, self.f = masks, factor
        self.B, self.h, self.w, self.K = masks.batch, masks.h, masks.w, masks.keep
        self.H, self.W = self.h * factor, self.w * factor
        self.n = self.K * factor * factor
        ids = _patch_ids(masks)
        self.py, self.px = ids // self.w, ids % self.w  # (B, K)
        self._tiles: dict[tuple, Tensor] = {}
        # flat index of every row in a (B * H * W) row-major canvas
        self.flat = self._index(self.H, self.W, 0, 0, factor, factor)

    def _index(self, hp: int, wp: int, lo_h: int, lo_w: int, th: int, tw: int) -> Tensor:
        """Flat indices into a ``(B, hp, wp)`` canvas of the ``th x tw`` tiles whose top-left
        corners sit at ``(py * f + lo_h - lo_h', ...)``; see :meth:`tiles`."""
        dev = self.py.device
        f = self.f
        ty = torch.arange(th, device=dev).view(1, 1, th, 1)
        tx = torch.arange(tw, device=dev).view(1, 1, 1, tw)
        y = self.py.view(self.B, self.K, 1, 1) * f + ty + lo_h
        x = self.px.view(self.B, self.K, 1, 1) * f + tx + lo_w
        b = torch.arange(self.B, device=dev).view(self.B, 1, 1, 1)
        return ((b * hp + y) * wp + x).reshape(-1)

    def tile_index(self, hp: int, wp: int, th: int, tw: int) -> Tensor:
        key = (hp, wp, th, tw)
        idx = self._tiles.get(key)
        if idx is None:
            idx = self._tiles[key] = self._index(hp, wp, 0, 0, th, tw)
        return idx

    def padded_rows(self, hp: int, wp: int, lo_h: int, lo_w: int) -> Tensor:
        key = ("rows", hp, wp, lo_h, lo_w)
        idx = self._tiles.get(key)
        if idx is None:
            idx = self._tiles[key] = self._index(hp, wp, lo_h, lo_w, self.f, self.f)
        return idx


def _patch_ids(masks: MaskPyramid) -> Tensor:
    """``(B, K)`` indices of the visible patches of each sample, ascending (no host sync)."""
    cache = masks.cache
    ids = cache.get("patch_ids")
    if ids is None:
        flat = masks.visible.reshape(masks.batch, masks.h * masks.w).to(torch.uint8)
        ids = torch.argsort(flat, dim=1, descending=True, stable=True)[:, : masks.keep]
        ids = cache["patch_ids"] = ids.sort(dim=1).values
    return ids


def geometry(masks: MaskPyramid, factor: int) -> _Geometry:
    key = ("geometry", factor)
    g = masks.cache.get(key)
    if g is None:
        g = masks.cache[key] = _Geometry(masks, factor)
    return g


class SparseMap(Tensor):
    """A feature map on the mask grid that stores only its visible rows.

    Its logical shape is ``(B, *c_before, H, W, *c_after)`` (``sdim`` is the index of ``H``:
    ``ndim - 2`` for channels-first maps, ``1`` for channels-last ones); ``rows`` has shape
    ``(B, n, *c_before, *c_after)``. It exists only inside :class:`FastSparseMode`, which
    translates every operation on it into operations on ``rows``; autograd runs on ``rows``.
    """

    rows: Tensor
    geo: _Geometry
    sdim: int

    @staticmethod
    def __new__(cls, rows: Tensor, geo: _Geometry, sdim: int):
        chans = tuple(rows.shape[2:])
        shape = (geo.B, *chans[: sdim - 1], geo.H, geo.W, *chans[sdim - 1:])
        t = Tensor._make_wrapper_subclass(cls, shape, dtype=rows.dtype, device=rows.device)
        t.rows, t.geo, t.sdim = rows, geo, sdim
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise SparseSemanticsError(
            f"'{func}' was applied to a sparse feature map outside the sparse encoder's forward"
        )

    def __repr__(self) -> str:
        return f"SparseMap(shape={tuple(self.shape)}, rows={tuple(self.rows.shape)}, factor={self.geo.f})"

    # logical dim -> rows dim
    def rdim(self, d: int) -> int:
        d %= self.dim()
        if d == 0:
            return 0
        if d in (self.sdim, self.sdim + 1):
            return 1
        return d + 1 if d < self.sdim else d - 1

    def like(self, rows: Tensor, sdim: int | None = None) -> SparseMap:
        return SparseMap(rows, self.geo, self.sdim if sdim is None else sdim)

    def canvas(self, fill: float = 0.0) -> Tensor:
        """The dense logical tensor, ``fill`` at masked sites."""
        g, r = self.geo, self.rows
        chans = tuple(r.shape[2:])
        c = math.prod(chans)
        out = r.new_full((g.B * g.H * g.W, c), fill)
        out.index_copy_(0, g.flat, r.reshape(g.B * g.n, c))
        out = out.view(g.B, g.H, g.W, *chans)
        nb = self.sdim - 1
        perm = (0, *range(3, 3 + nb), 1, 2, *range(3 + nb, 3 + len(chans)))
        return out.permute(perm)


def to_dense(t):
    """A plain tensor for ``t``: a SparseMap becomes its dense map (zero at masked sites), other
    values are returned unchanged. Safe to call in forward hooks inside the sparse forward."""
    if not isinstance(t, SparseMap):
        return t
    with torch._C.DisableTorchFunction():
        return t.canvas()


def to_rows(t: Tensor, geo: _Geometry, sdim: int) -> SparseMap:
    """Gather the visible sites of a dense tensor laid out like a map at ``geo``."""
    nd = t.dim()
    chans = [d for d in range(1, nd) if d not in (sdim, sdim + 1)]
    dense = t.permute(0, sdim, sdim + 1, *chans)
    shape = [t.shape[d] for d in chans]
    rows = dense.reshape(geo.B * geo.H * geo.W, math.prod(shape)).index_select(0, geo.flat)
    return SparseMap(rows.view(geo.B, geo.n, *shape), geo, sdim)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1] if len(v) > 1 else v[0]))
    return (int(v), int(v))


def _maps(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, SparseMap):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from (t for t in a if isinstance(t, SparseMap))


def _replace(obj, fn):
    if isinstance(obj, SparseMap):
        return fn(obj)
    if isinstance(obj, (tuple, list)) and any(isinstance(t, SparseMap) for t in obj):
        return type(obj)(fn(t) if isinstance(t, SparseMap) else t for t in obj)
    return obj


def _meta(t: Tensor, distinct_strides: bool = False) -> Tensor:
    if distinct_strides:
        return torch.empty_strided(t.shape, [1 << i for i in range(t.dim())], dtype=t.dtype, device="meta")
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


_METADATA = frozenset(
    """
    size dim ndimension numel stride is_contiguous element_size data_ptr storage_offset get_device
    is_floating_point is_complex __len__ __hash__ __format__ __index__ _assert
    """.split()
)
_SAFE_PROPERTIES = frozenset(
    "shape dtype device ndim is_cuda is_cpu is_mps is_meta is_sparse is_quantized is_nested layout "
    "requires_grad names is_leaf grad_fn".split()
)
_CREATE_DENSE = frozenset("new_empty new_zeros new_ones new_full new_tensor".split())
_SHAPE_OPS = frozenset(
    "view view_as reshape reshape_as flatten unflatten squeeze squeeze_ unsqueeze unsqueeze_ expand expand_as "
    "broadcast_to".split()
)
_PERMUTE_OPS = frozenset("permute transpose swapaxes swapdims movedim moveaxis".split())
_SPLIT_OPS = frozenset("split split_with_sizes chunk unbind tensor_split".split())
_NO_OPS = frozenset("contiguous".split())
_INPLACE_DUNDERS = frozenset("__iadd__ __isub__ __imul__ __itruediv__ __ipow__ __iand__ __ior__".split())


class FastSparseMode(SparseMode):
    """Sparse semantics computed at visible sites only; see the module docstring."""

    def __init__(self, masks: MaskPyramid, path=None, sync_group=None, min_tile: int = 2):
        if not supports_fast(masks):
            raise ValueError("the fast sparse form needs the same number of visible patches in every sample")
        super().__init__(masks, path, sync_group)
        self.min_tile = min_tile  # smallest output tile computed from halo tiles instead of the canvas

    # -- conversions -----------------------------------------------------------------------
    def wrap_input(self, x: Tensor) -> SparseMap:
        f = self.cf_factor(x)
        return to_rows(x, geometry(self.masks, f), x.dim() - 2)

    def promote(self, t):
        """A dense channels-first map on the grid becomes a SparseMap (its masked sites dropped)."""
        if isinstance(t, Tensor) and not isinstance(t, SparseMap):
            f = self.cf_factor(t)
            if f is not None:
                return to_rows(t, geometry(self.masks, f), t.dim() - 2)
        return t

    # -- dispatch --------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            handler = _FAST.get(func)
        except TypeError:
            handler = None
        name = getattr(func, "__name__", None)
        maps = list(_maps(args, kwargs))
        if handler is not None:
            return handler(self, func, *args, **kwargs)
        if not maps:
            if name in ref._REDUCTIONS and args and self.cf_factor(args[0]) is not None:
                return self._reduce_map(func, name, self.promote(args[0]), args[1:], kwargs)
            return super().__torch_function__(func, types, args, kwargs)
        if name == "__get__":
            prop = getattr(getattr(func, "__self__", None), "__name__", None)
            if prop in _SAFE_PROPERTIES:
                return func(*args, **kwargs)
            if prop == "data":
                return args[0].like(args[0].rows.data)
            self.fail(func, args[0], f"reads the property '{prop}' of a sparse map")
        if name in _METADATA:
            return func(*args, **kwargs)
        if name in _CREATE_DENSE:
            return func(args[0].rows, *args[1:], **kwargs)
        if name in _NO_OPS:
            return args[0]
        if name == "to":
            kwargs.pop("memory_format", None)
            x = args[0]
            rest = [a.rows if isinstance(a, SparseMap) else a for a in args[1:]]
            return x.like(x.rows.to(*rest, **kwargs)) if rest or kwargs else x
        if name in _SHAPE_OPS:
            return self._reshape(func, name, args, kwargs)
        if name in _PERMUTE_OPS:
            return self._permute(func, args, kwargs)
        if name in _SPLIT_OPS or name in ("narrow", "select"):
            return self._split(func, name, args, kwargs)
        if name == "__getitem__":
            return self._getitem(func, args[0], args[1])
        if name in ("cat", "concat", "concatenate", "stack"):
            return self._cat(func, name, args, kwargs)
        if name in ref._REDUCTIONS and isinstance(args[0], SparseMap):
            return self._reduce_map(func, name, args[0], args[1:], kwargs)
        if name in ref._PER_SITE:
            return self._per_site(func, name, args, kwargs)
        self.fail(func, maps[0], "is not known to have a sparse meaning")

    # -- per-site ----------------------------------------------------------------------------
    def _per_site(self, func, name, args, kwargs):
        maps = list(_maps(args, kwargs))
        lead = maps[0]
        if name.endswith("_like"):
            return lead.like(func(lead.rows, *args[1:], **kwargs))
        for m in maps[1:]:
            if m.geo is not lead.geo or m.sdim != lead.sdim or m.dim() != lead.dim():
                self.fail(func, m, f"combines sparse maps of different layouts {tuple(lead.shape)} and {tuple(m.shape)}")
        shapes = [a.shape for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        try:
            logical = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            self.fail(func, lead, "broadcasts tensors of incompatible shapes")
        if len(logical) != lead.dim():
            self.fail(func, lead, f"broadcasts a sparse map to {tuple(logical)}")

        def conv(a):
            if isinstance(a, SparseMap):
                return a.rows
            if isinstance(a, Tensor) and a.dim() > 0:
                return self._dense_as_rows(a, lead, logical, func)
            return a

        cargs = [conv(a) for a in args]
        ckw = {k: conv(v) for k, v in kwargs.items()}
        inplace = (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS
        if inplace and not isinstance(args[0], SparseMap):
            self.fail(func, lead, "writes a sparse map into a dense tensor in place")
        out = func(*cargs, **ckw)
        if inplace:
            return args[0]
        if isinstance(out, Tensor) and out.dim() == lead.rows.dim() and out.shape[:2] == lead.rows.shape[:2]:
            return lead.like(out)
        if isinstance(out, Tensor):
            self.fail(func, lead, f"gives a result of unexpected shape {tuple(out.shape)}")
        return out

    def _dense_as_rows(self, a: Tensor, lead: SparseMap, logical, func) -> Tensor:
        """A dense operand of a per-site op in the rows layout of ``lead`` (broadcastable)."""
        nd = len(logical)
        a = a.reshape((1,) * (nd - a.dim()) + tuple(a.shape))
        s = lead.sdim
        chans = [d for d in range(1, nd) if d not in (s, s + 1)]
        if a.shape[s] == 1 and a.shape[s + 1] == 1:
            return a.permute(0, s, *chans, s + 1).squeeze(-1)
        full = list(a.shape)
        full[0], full[s], full[s + 1] = lead.geo.B, lead.geo.H, lead.geo.W
        return to_rows(a.expand(full), lead.geo, s).rows

    # -- shapes --------------------------------------------------------------------------------
    def _reshape(self, func, name, args, kwargs):
        x = args[0]
        if not isinstance(x, SparseMap):
            target = next(_maps(args, kwargs))
            if name == "expand_as" and x.dim() <= target.dim():  # a broadcast operand, e.g. gates
                rows = self._dense_as_rows(x, target, tuple(target.shape), func)
                return target.like(rows.expand(target.rows.shape[:2] + rows.shape[2:]))
            self.fail(func, target, "reshapes a dense tensor to a sparse map's shape")
        margs = [_replace(a, _meta) for a in args]
        mkw = {k: _replace(v, _meta) for k, v in kwargs.items()}
        new = tuple(func(*margs, **mkw).shape)
        g = x.geo
        before = math.prod(x.shape[1: x.sdim])
        for j in range(1, len(new) - 1):
            if new[j: j + 2] == (g.H, g.W) and new[0] == g.B and math.prod(new[1:j]) == before:
                chans = (*new[1:j], *new[j + 2:])
                if name in ("expand", "expand_as", "broadcast_to"):
                    rows = x.rows.expand(g.B, g.n, *chans)
                else:
                    rows = x.rows.reshape(g.B, g.n, *chans)
                return SparseMap(rows, g, j)
        self.fail(func, x, f"rearranges the spatial dims (result {new})")

    def _permute(self, func, args, kwargs):
        x = args[0]
        out = func(_meta(x, distinct_strides=True), *args[1:], **kwargs)
        perm = [int(math.log2(s)) for s in out.stride()]
        s = x.sdim
        if perm[0] != 0 or s not in perm:
            self.fail(func, x, f"moves the batch or spatial dims (permutation {perm})")
        j = perm.index(s)
        if j + 1 >= len(perm) or perm[j + 1] != s + 1:
            self.fail(func, x, f"separates the spatial dims (permutation {perm})")
        chans = [x.rdim(p) for i, p in enumerate(perm) if i not in (0, j, j + 1)]
        return SparseMap(x.rows.permute(0, 1, *chans), x.geo, j)

    def _channel_dim(self, func, x: SparseMap, dim: int) -> int:
        r = x.rdim(dim)
        if r < 2:
            self.fail(func, x, f"splits or indexes the batch or spatial dims (dim {dim})")
        return r

    def _split(self, func, name, args, kwargs):
        x = args[0]
        if name == "narrow":
            dim = kwargs.get("dim", args[1])
            return x.like(x.rows.narrow(self._channel_dim(func, x, dim), *args[2:]))
        if name == "select":
            dim = kwargs.get("dim", args[1])
            r = self._channel_dim(func, x, dim)
            keep_s = x.sdim - 1 if (dim % x.dim()) < x.sdim else x.sdim
            return SparseMap(x.rows.select(r, *args[2:]), x.geo, keep_s)
        dim = kwargs.pop("dim", None)
        rest = list(args[1:])
        if dim is None:
            default = 0
            if name == "unbind":
                dim = rest.pop(0) if rest else default
            else:
                dim = rest.pop(1) if len(rest) > 1 else default
        r = self._channel_dim(func, x, dim)
        parts = func(x.rows, *rest, dim=r, **kwargs) if name != "unbind" else func(x.rows, r)
        if name == "unbind":
            keep_s = x.sdim - 1 if (dim % x.dim()) < x.sdim else x.sdim
            return tuple(SparseMap(p, x.geo, keep_s) for p in parts)
        return tuple(x.like(p) for p in parts)

    def _getitem(self, func, x, index):
        if not isinstance(x, SparseMap):
            self.fail(func, next(_maps((index,), {})), "indexes with a sparse map")
        items = list(index) if isinstance(index, tuple) else [index]
        if any(i is Ellipsis for i in items):
            k = items.index(Ellipsis)
            items[k: k + 1] = [slice(None)] * (x.dim() - len(items) + 1)
        items += [slice(None)] * (x.dim() - len(items))
        rows_index: list = [slice(None), slice(None)]
        sdim = x.sdim
        for d, it in enumerate(items):
            full = isinstance(it, slice) and it == slice(None)
            if d == 0 or d in (x.sdim, x.sdim + 1):
                if not full:
                    self.fail(func, x, f"indexes the batch or spatial dims ({index!r})")
                continue
            if isinstance(it, slice):
                rows_index.append(it)
            elif isinstance(it, int):
                rows_index.append(it)
                if d < x.sdim:
                    sdim -= 1
            else:
                self.fail(func, x, f"indexes a sparse map with {type(it).__name__}")
        return SparseMap(x.rows[tuple(rows_index)], x.geo, sdim)

    def _cat(self, func, name, args, kwargs):
        seq = list(args[0])
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        lead = next(t for t in seq if isinstance(t, SparseMap))
        seq = [self.promote(t) for t in seq]
        for t in seq:
            if not isinstance(t, SparseMap) or t.geo is not lead.geo or t.sdim != lead.sdim:
                self.fail(func, lead, "concatenates a sparse map with a tensor of another layout")
        nd = lead.dim()
        if name == "stack":
            d = dim % (nd + 1)
            if d == 0:
                self.fail(func, lead, "stacks sparse maps along the batch dim")
            sdim = lead.sdim + 1 if d <= lead.sdim else lead.sdim
            r = d + 1 if d <= lead.sdim else d - 1
            return SparseMap(torch.stack([t.rows for t in seq], r), lead.geo, sdim)
        r = self._channel_dim(func, lead, dim)
        return lead.like(torch.cat([t.rows for t in seq], r))

    # -- reductions ------------------------------------------------------------------------------
    def _reduce_map(self, func, name, x: SparseMap, rest, kwargs):
        if name in ("max", "min") and rest and isinstance(rest[0], Tensor):
            return self._per_site(func, name, (x, *rest), kwargs)
        kwargs = dict(kwargs)
        rest = list(rest)
        pos = 1 if name in ("norm", "vector_norm") else 0
        if "dim" in kwargs or "axis" in kwargs:
            dim = kwargs.pop("dim", None) if "dim" in kwargs else kwargs.pop("axis")
        elif len(rest) > pos:
            dim = rest.pop(pos)
        else:
            dim = None
        nd = x.dim()
        if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
            dims = list(range(nd))
        elif isinstance(dim, (tuple, list)):
            dims = sorted({d % nd for d in dim})
        else:
            dims = [dim % nd]
        spatial = {x.sdim, x.sdim + 1}
        hit = spatial & set(dims)
        if hit and hit != spatial:
            self.fail(func, x, f"reduces over part of the spatial dims (dims {dims})")
        if hit and name not in ref._MASKED_REDUCTIONS:
            self.fail(func, x, f"reduces over the spatial dims with '{name}', which has no masked form here")
        rdims = sorted({x.rdim(d) for d in dims})
        keepdim = kwargs.pop("keepdim", False)
        if len(rest) > pos and isinstance(rest[pos], bool):
            keepdim = rest.pop(pos)
        single = name in ("max", "min", "argmax", "argmin", "softmax", "log_softmax", "cumsum", "cumprod")
        if single:
            if len(rdims) != 1:
                self.fail(func, x, f"reduces with '{name}' over several dims")
            out = func(x.rows, *rest, dim=rdims[0], keepdim=keepdim, **kwargs) if name in (
                "max", "min", "argmax", "argmin") else func(x.rows, rdims[0], *rest, **kwargs)
        else:
            if name == "norm" and not rest and "p" not in kwargs:
                rest = [2]
            out = func(x.rows, *rest, dim=rdims, keepdim=True, **kwargs)
        vals = out[0] if isinstance(out, tuple) else out
        if name in ("softmax", "log_softmax", "cumsum", "cumprod"):
            return x.like(vals)
        if not hit:  # over channels only: still a map
            if not single:
                keep = x.like(vals)
                return keep if keepdim else self._squeeze_channels(x, keep, dims)
            res = SparseMap(vals, x.geo, x.sdim - sum(1 for d in dims if d < x.sdim and not keepdim))
            return type(out)((res, SparseMap(out[1], x.geo, res.sdim))) if isinstance(out, tuple) else res
        # over the spatial dims: a dense result with the logical shape the reduction gives
        shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
        if not keepdim:
            shape = [s for d, s in enumerate(shape) if d not in dims]
        v = vals.unsqueeze(2)  # (b, 1, 1, *chans) in rows order
        nb = x.sdim - 1
        v = v.permute(0, *range(3, 3 + nb), 1, 2, *range(3 + nb, v.dim()))
        return v.reshape(shape)

    def _squeeze_channels(self, x: SparseMap, m: SparseMap, dims) -> SparseMap:
        rdims = sorted((x.rdim(d) for d in dims), reverse=True)
        rows = m.rows
        for r in rdims:
            rows = rows.squeeze(r)
        sdim = x.sdim - sum(1 for d in dims if d < x.sdim)
        return SparseMap(rows, x.geo, sdim)


# -- layer handlers ---------------------------------------------------------------------------------
def _via_reference(mode: FastSparseMode, handler, func, x, /, *args, fill: float = 0.0, **kwargs):
    """Run the reference handler on the dense canvas and gather the visible outputs."""
    dense = x.canvas(fill) if isinstance(x, SparseMap) else x
    out = handler(mode, func, dense, *args, **kwargs)
    if isinstance(out, (tuple, list)):
        return type(out)([mode.promote(out[0]), *out[1:]])
    return mode.promote(out)


def _conv_args(func, args, kwargs):
    """Normalise F.conv2d / torch.convolution / torch._convolution arguments."""
    names = ("weight", "bias", "stride", "padding", "dilation")
    if func in (F.conv2d,):
        vals = dict(zip(names, args))
        vals.update({k: v for k, v in kwargs.items() if k in names})
        groups = kwargs.get("groups", args[5] if len(args) > 5 else 1)
        return (vals["weight"], vals.get("bias"), vals.get("stride", 1), vals.get("padding", 0),
                vals.get("dilation", 1), groups, False)
    if func in (torch.convolution, torch._convolution):
        w, b, stride, padding, dilation, transposed, _, groups = args[:8]
        return w, b, stride, padding, dilation, groups, bool(transposed)
    return None


def _fast_conv(mode: FastSparseMode, func, x, /, *args, **kwargs):
    x = mode.promote(x)
    parsed = _conv_args(func, args, kwargs)
    if not isinstance(x, SparseMap) or parsed is None or parsed[6] or x.sdim != 2 or x.rows.dim() != 3:
        return _via_reference(mode, ref._conv, func, x, *args, **kwargs)
    w, b, stride, padding, dilation, groups, _ = parsed
    if w.dim() != 4:
        return _via_reference(mode, ref._conv, func, x, *args, **kwargs)
    kh, kw = w.shape[-2:]
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            ph = pw = 0
        elif padding == "same" and (dh * (kh - 1)) % 2 == 0 and (dw * (kw - 1)) % 2 == 0:
            ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
        else:
            return _via_reference(mode, ref._conv, func, x, *args, **kwargs)
    else:
        ph, pw = _pair(padding)
    g = x.geo
    f = g.f
    ho = (g.H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (g.W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if sh != sw or f % sh or ho * sh != g.H or wo * sw != g.W:
        return _via_reference(mode, ref._conv, func, x, *args, **kwargs)
    fo = f // sh
    go = geometry(mode.masks, fo)
    rows = x.rows
    if kh == kw == 1 and ph == pw == 0 and groups == 1:
        if sh > 1:
            rows = rows.view(g.B, g.K, f, f, -1)[:, :, ::sh, ::sw].reshape(g.B, go.n, -1)
        return SparseMap(F.linear(rows, w.flatten(1), b), go, 2)
    cin = rows.shape[-1]
    depthwise = groups > 1 and groups == cin
    if fo == 1 and groups == 1:
        # one output site per patch: gather each site's receptive field and multiply (im2col)
        cols = _tiles(x, 1, sh, kh, kw, dh, dw, ph, pw, 0.0, channels_last=True)
        th, tw = cols.shape[1:3]
        if th != kh or tw != kw:  # dilated: keep the kernel's taps only
            cols = cols[:, ::dh, ::dw]
        out = F.linear(cols.reshape(g.B, g.K, -1), w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), b)
        return SparseMap(out, go, 2)
    if fo < (4 if depthwise else mode.min_tile):
        # small tiles: the halo would cost more than computing the whole (zero) canvas
        return _dense_then_gather(mode, func, x, args, kwargs)
    tiles = _tiles(x, fo, sh, kh, kw, dh, dw, ph, pw, 0.0)
    out = F.conv2d(tiles, w, b, (sh, sw), 0, (dh, dw), groups)
    return SparseMap(out.permute(0, 2, 3, 1).reshape(g.B, go.n, out.shape[1]), go, 2)


def _dense_then_gather(mode: FastSparseMode, func, x: SparseMap, args, kwargs, fill: float = 0.0):
    """Run ``func`` on the dense canvas (``fill`` at masked sites) and keep its visible outputs."""
    out = func(x.canvas(fill), *args, **kwargs)
    res = mode.promote(out)
    if not isinstance(res, SparseMap):
        mode.mask_output(out, func)  # raises for a map that left the grid
    return res


def _tiles(x: SparseMap, fo: int, st: int, kh: int, kw: int, dh: int, dw: int, ph: int, pw: int,
           fill: float, channels_last: bool = False) -> Tensor:
    """``(B*K, C, th, tw)`` input tiles (with halo) whose windows give the ``fo x fo`` outputs of
    each visible patch (``(B*K, th, tw, C)`` with ``channels_last``)."""
    g, rows = x.geo, x.rows
    c = rows.shape[-1]
    th = (fo - 1) * st + dh * (kh - 1) + 1
    tw = (fo - 1) * st + dw * (kw - 1) + 1
    if ph == pw == 0 and th <= g.f and tw <= g.f:
        t = rows.view(g.B * g.K, g.f, g.f, c)[:, :th, :tw]
    else:
        hp = max(g.H + ph, (g.h - 1) * g.f + th)
        wp = max(g.W + pw, (g.w - 1) * g.f + tw)
        canvas = rows.new_full((g.B * hp * wp, c), fill)
        canvas.index_copy_(0, g.padded_rows(hp, wp, ph, pw), rows.reshape(g.B * g.n, c))
        t = canvas.index_select(0, g.tile_index(hp, wp, th, tw)).view(g.B * g.K, th, tw, c)
    return t if channels_last else t.permute(0, 3, 1, 2)


def _pool_args(func, args, kwargs):
    """``(kernel, stride, padding, dilation, ceil_mode, return_indices)`` of any max-pool spelling."""
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kwargs.items() if k in names})
    k = vals["kernel_size"]
    s = vals.get("stride")
    if s is None or (isinstance(s, (tuple, list)) and len(s) == 0):
        s = k
    return (_pair(k), _pair(s), _pair(vals.get("padding", 0)), _pair(vals.get("dilation", 1)),
            bool(vals.get("ceil_mode", False)), bool(vals.get("return_indices", False)) or
            func is F.max_pool2d_with_indices)


def _fast_max_pool(mode: FastSparseMode, func, x, /, *args, **kwargs):
    x = mode.promote(x)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil, indices = _pool_args(func, args, kwargs)
    if isinstance(x, SparseMap) and x.sdim == 2 and x.rows.dim() == 3 and not ceil and not indices:
        g = x.geo
        ho = (g.H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (g.W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if sh == sw and g.f % sh == 0 and ho * sh == g.H and wo * sw == g.W and g.f // sh >= mode.min_tile:
            go = geometry(mode.masks, g.f // sh)
            tiles = _tiles(x, go.f, sh, kh, kw, dh, dw, ph, pw, float("-inf"))
            out = F.max_pool2d(tiles, (kh, kw), (sh, sw), 0, (dh, dw))
            return SparseMap(out.permute(0, 2, 3, 1).reshape(g.B, go.n, out.shape[1]), go, 2)
    return _via_reference(mode, ref._max_pool, func, x, *args, fill=float("-inf"), **kwargs)


def _fast_adaptive_pool(mode: FastSparseMode, func, x, /, output_size, *args, **kwargs):
    x = mode.promote(x)
    if not isinstance(x, SparseMap) or x.sdim != x.dim() - 2:
        return _via_reference(mode, ref._adaptive_pool, func, x, output_size, *args, **kwargs)
    size = tuple(x.shape[-2 + i] if s is None else s for i, s in enumerate(ref._pair(output_size)))
    if size == tuple(x.shape[-2:]):
        return x
    if size != (1, 1) or args or kwargs.get("return_indices"):
        mode.fail(func, x, f"pools to {size}, which only has a sparse meaning for 1x1")
    r = x.rows.amax(1) if func is F.adaptive_max_pool2d else x.rows.mean(1)
    return r.reshape(*r.shape, 1, 1)


def _rows_2d(mode, func, x: SparseMap, what: str) -> Tensor:
    if x.sdim != 2 or x.rows.dim() != 3:
        mode.fail(func, x, f"is a {what} over a map that is not (B, C, H, W)")
    return x.rows


def _fast_batch_norm(mode: FastSparseMode, func, x, running_mean, running_var, weight=None, bias=None,
                     training=False, momentum=0.1, eps=1e-5):
    x = mode.promote(x)
    if not isinstance(x, SparseMap):
        return func(x, running_mean, running_var, weight, bias, training, momentum, eps)
    rows = _rows_2d(mode, func, x, "batch norm")
    b, n, c = rows.shape
    flat = rows.reshape(b * n, c)
    if training or running_mean is None:
        out = batch_norm_rows(flat, running_mean, running_var, weight, bias, True, momentum, eps, mode.sync_group)
    else:
        out = F.batch_norm(flat, running_mean, running_var, weight, bias, False, momentum or 0.0, eps)
    return x.like(out.view(b, n, c))


def _fast_group_norm(mode: FastSparseMode, func, x, num_groups, weight=None, bias=None, eps=1e-5):
    x = mode.promote(x)
    if not isinstance(x, SparseMap):
        return func(x, num_groups, weight, bias, eps)
    rows = _rows_2d(mode, func, x, "group norm")
    return x.like(F.group_norm(rows.transpose(1, 2), num_groups, weight, bias, eps).transpose(1, 2))


def _fast_instance_norm(mode: FastSparseMode, func, x, running_mean=None, running_var=None, weight=None,
                        bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    x = mode.promote(x)
    if not isinstance(x, SparseMap):
        return func(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    rows = _rows_2d(mode, func, x, "instance norm")
    if not use_input_stats:
        out = F.instance_norm(rows.transpose(1, 2).unsqueeze(-1), running_mean, running_var, weight, bias, False,
                              momentum, eps)
        return x.like(out.squeeze(-1).transpose(1, 2))
    if running_mean is not None:
        mode.fail(func, x, "is an instance norm with running statistics, which is not supported")
    return x.like(F.group_norm(rows.transpose(1, 2), rows.shape[2], weight, bias, eps).transpose(1, 2))


def _trailing_channels(x: SparseMap) -> int:
    return x.dim() - (x.sdim + 2)


def _fast_layer_norm(mode: FastSparseMode, func, x, /, normalized_shape, *args, **kwargs):
    if not isinstance(x, SparseMap):
        return ref._per_channel_norm(mode, func, x, normalized_shape, *args, **kwargs)
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    if n > _trailing_channels(x):
        mode.fail(func, x, "normalises over spatial dims")
    if func is torch.layer_norm:
        return x.like(F.layer_norm(x.rows, normalized_shape, *args[:3]))
    return x.like(func(x.rows, normalized_shape, *args, **kwargs))


def _fast_linear(mode: FastSparseMode, func, x, /, *args, **kwargs):
    if not isinstance(x, SparseMap):
        return ref._linear(mode, func, x, *args, **kwargs)
    if _trailing_channels(x) < 1:
        mode.fail(func, x, "mixes the width dim of a channels-first map")
    return x.like(func(x.rows, *args, **kwargs))


def _dense_handler(handler, fill: float = 0.0):
    def run(mode: FastSparseMode, func, x, /, *args, **kwargs):
        return _via_reference(mode, handler, func, mode.promote(x), *args, fill=fill, **kwargs)

    return run


def _fast_pad(mode: FastSparseMode, func, x, /, *args, **kwargs):
    return func(x.canvas() if isinstance(x, SparseMap) else mode.mask_input(x), *args, **kwargs)


def _aten_batch_norm(mode, func, x, weight, bias, running_mean, running_var, training, momentum, eps, *_):
    return _fast_batch_norm(mode, F.batch_norm, x, running_mean, running_var, weight, bias, training, momentum, eps)


def _aten_group_norm(mode, func, x, num_groups, weight=None, bias=None, eps=1e-5, *_):
    return _fast_group_norm(mode, F.group_norm, x, num_groups, weight, bias, eps)


def _aten_instance_norm(mode, func, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, *_):
    return _fast_instance_norm(mode, F.instance_norm, x, running_mean, running_var, weight, bias, use_input_stats,
                               momentum, eps)


_FAST = {
    F.conv2d: _fast_conv,
    torch.convolution: _fast_conv,
    torch._convolution: _fast_conv,
    F.conv_transpose2d: _dense_handler(ref._conv),
    torch.conv_transpose2d: _dense_handler(ref._conv),
    F.interpolate: _dense_handler(ref._conv),
    F.upsample: _dense_handler(ref._conv),
    F.avg_pool2d: _dense_handler(ref._avg_pool),
    F.max_pool2d: _fast_max_pool,
    F.max_pool2d_with_indices: _fast_max_pool,
    torch.max_pool2d: _fast_max_pool,
    F.adaptive_avg_pool2d: _fast_adaptive_pool,
    F.adaptive_max_pool2d: _fast_adaptive_pool,
    F.batch_norm: _fast_batch_norm,
    torch.batch_norm: _aten_batch_norm,
    F.group_norm: _fast_group_norm,
    torch.group_norm: _aten_group_norm,
    F.instance_norm: _fast_instance_norm,
    torch.instance_norm: _aten_instance_norm,
    F.layer_norm: _fast_layer_norm,
    torch.layer_norm: _fast_layer_norm,
    F.linear: _fast_linear,
    F.pad: _fast_pad,
}
if hasattr(F, "_max_pool2d"):
    _FAST[F._max_pool2d] = _fast_max_pool
if hasattr(F, "rms_norm"):
    _FAST[F.rms_norm] = _fast_layer_norm
