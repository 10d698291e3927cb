"""Feature maps held as the rows of their visible sites: :class:`SparseMap` and its :class:`Geometry`.

Every sample keeps the same number ``K`` of visible patches, so at a map of ``f x f`` sites per
patch each sample has exactly ``n = K * f * f`` rows: all shapes are static, and the index
tensors are built once per batch on the mask's device without host synchronisation. Rows are
ordered patch by patch (ascending patch index), row-major within a patch, so the rows of one
sample form ``K`` tiles of ``f x f`` sites.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..masking import MaskPyramid
from .ops import SparseSemanticsError

__all__ = ["Geometry", "SparseMap", "supports_fast", "to_dense", "to_rows", "replace_maps", "meta_like"]


def supports_fast(masks: MaskPyramid) -> bool:
    """The fast form needs the same number of visible patches in every sample."""
    return masks.keep is not None


class Geometry:
    """Where the rows of a map with ``factor x factor`` sites per patch sit, for one batch.

    ``batch``, ``grid_height x grid_width`` patches, ``patches`` visible per sample; the map is
    ``height x width`` sites and each sample has ``rows_per_sample`` rows. ``patch_row`` and
    ``patch_col`` ``(batch, patches)`` locate each visible patch on the grid; ``sites`` is the
    flat index of every row in a ``(batch * height * width)`` row-major canvas.
    """

    def __init__(self, masks: MaskPyramid, factor: int):
        self.masks, self.factor = masks, factor
        self.batch, self.grid_height, self.grid_width, self.patches = masks.batch, masks.h, masks.w, masks.keep
        self.height, self.width = self.grid_height * factor, self.grid_width * factor
        self.rows_per_sample = self.patches * factor * factor
        ids = masks.visible_patch_ids()
        self.patch_row, self.patch_col = ids // self.grid_width, ids % self.grid_width  # (B, K)
        self._tile_index: dict[tuple[int, int, int, int], Tensor] = {}
        self._padded_rows: dict[tuple[int, int, int, int], Tensor] = {}
        self.sites = self._tile_sites(self.height, self.width, 0, 0, factor, factor)

    def _tile_sites(self, canvas_height: int, canvas_width: int, top: int, left: int, tile_height: int,
                    tile_width: int) -> Tensor:
        """Flat indices into a ``(batch, canvas_height, canvas_width)`` canvas of the
        ``tile_height x tile_width`` tiles whose top-left corners sit at the visible patches'
        corners shifted by ``(top, left)``, tile by tile, row-major within a tile."""
        dev = self.patch_row.device
        f, b, k = self.factor, self.batch, self.patches
        ty = torch.arange(tile_height, device=dev).view(1, 1, tile_height, 1)
        tx = torch.arange(tile_width, device=dev).view(1, 1, 1, tile_width)
        y = self.patch_row.view(b, k, 1, 1) * f + ty + top
        x = self.patch_col.view(b, k, 1, 1) * f + tx + left
        sample = torch.arange(b, device=dev).view(b, 1, 1, 1)
        return ((sample * canvas_height + y) * canvas_width + x).reshape(-1)

    def tile_index(self, canvas_height: int, canvas_width: int, tile_height: int, tile_width: int) -> Tensor:
        """Indices of the ``tile_height x tile_width`` tiles (patch corners at the canvas origin)."""
        key = (canvas_height, canvas_width, tile_height, tile_width)
        idx = self._tile_index.get(key)
        if idx is None:
            idx = self._tile_index[key] = self._tile_sites(canvas_height, canvas_width, 0, 0, tile_height, tile_width)
        return idx

    def padded_rows(self, canvas_height: int, canvas_width: int, top: int, left: int) -> Tensor:
        """Where this map's rows go in a canvas padded by ``top`` rows and ``left`` columns."""
        key = (canvas_height, canvas_width, top, left)
        idx = self._padded_rows.get(key)
        if idx is None:
            idx = self._padded_rows[key] = self._tile_sites(canvas_height, canvas_width, top, left, self.factor,
                                                            self.factor)
        return idx


class SparseMap(Tensor):
    """A feature map on the mask grid that stores only its visible rows.

    Its logical shape is ``(B, *c_before, H, W, *c_after)`` (``spatial_dim`` is the index of
    ``H``: ``ndim - 2`` for channels-first maps, ``1`` for channels-last ones); ``rows`` has
    shape ``(B, n, *c_before, *c_after)``. It exists only inside the fast sparse form, which
    translates every operation on it into operations on ``rows``; autograd runs on ``rows``.
    """

    rows: Tensor
    geometry: Geometry
    spatial_dim: int

    @staticmethod
    def __new__(cls, rows: Tensor, geometry: Geometry, spatial_dim: int):
        chans = tuple(rows.shape[2:])
        shape = (geometry.batch, *chans[: spatial_dim - 1], geometry.height, geometry.width, *chans[spatial_dim - 1:])
        t = Tensor._make_wrapper_subclass(cls, shape, dtype=rows.dtype, device=rows.device)
        t.rows, t.geometry, t.spatial_dim = rows, geometry, spatial_dim
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise SparseSemanticsError(
            f"'{func}' was applied to a sparse feature map outside the sparse encoder's forward"
        )

    def __repr__(self) -> str:
        return f"SparseMap(shape={tuple(self.shape)}, rows={tuple(self.rows.shape)}, factor={self.geometry.factor})"

    def rows_dim(self, d: int) -> int:
        """The dim of ``rows`` that holds logical dim ``d`` (both spatial dims live in rows dim 1)."""
        d %= self.dim()
        if d == 0:
            return 0
        if d in (self.spatial_dim, self.spatial_dim + 1):
            return 1
        return d + 1 if d < self.spatial_dim else d - 1

    def with_rows(self, rows: Tensor, spatial_dim: int | None = None) -> SparseMap:
        """A map of the same geometry (and layout, unless ``spatial_dim`` is given) holding ``rows``."""
        return SparseMap(rows, self.geometry, self.spatial_dim if spatial_dim is None else spatial_dim)

    def canvas(self, fill: float = 0.0) -> Tensor:
        """The dense logical tensor, ``fill`` at masked sites."""
        g, r = self.geometry, self.rows
        chans = tuple(r.shape[2:])
        c = math.prod(chans)
        out = r.new_full((g.batch * g.height * g.width, c), fill)
        out.index_copy_(0, g.sites, r.reshape(g.batch * g.rows_per_sample, c))
        out = out.view(g.batch, g.height, g.width, *chans)
        nb = self.spatial_dim - 1
        perm = (0, *range(3, 3 + nb), 1, 2, *range(3 + nb, 3 + len(chans)))
        return out.permute(perm)


def to_dense(t):
    """A plain tensor for ``t``: a SparseMap becomes its dense map (zero at masked sites), other
    values are returned unchanged. Safe to call in forward hooks inside the sparse forward."""
    if not isinstance(t, SparseMap):
        return t
    with torch._C.DisableTorchFunction():
        return t.canvas()


def to_rows(t: Tensor, geometry: Geometry, spatial_dim: int) -> SparseMap:
    """Gather the visible sites of a dense tensor laid out like a map at ``geometry``."""
    nd = t.dim()
    chans = [d for d in range(1, nd) if d not in (spatial_dim, spatial_dim + 1)]
    dense = t.permute(0, spatial_dim, spatial_dim + 1, *chans)
    shape = [t.shape[d] for d in chans]
    g = geometry
    rows = dense.reshape(g.batch * g.height * g.width, math.prod(shape)).index_select(0, g.sites)
    return SparseMap(rows.view(g.batch, g.rows_per_sample, *shape), g, spatial_dim)


def replace_maps(obj, fn):
    """``obj`` with ``fn`` applied to it if it is a SparseMap, or to each SparseMap in it if it is
    a list or tuple."""
    if isinstance(obj, SparseMap):
        return fn(obj)
    if isinstance(obj, (tuple, list)) and any(isinstance(t, SparseMap) for t in obj):
        return type(obj)(fn(t) if isinstance(t, SparseMap) else t for t in obj)
    return obj


def meta_like(t: Tensor, distinct_strides: bool = False) -> Tensor:
    """A ``meta`` tensor of ``t``'s logical shape, to let torch work out the shape (or, with
    ``distinct_strides``, the dim order) of an operation's result."""
    if distinct_strides:
        return torch.empty_strided(t.shape, [1 << i for i in range(t.dim())], dtype=t.dtype, device="meta")
    return torch.empty(t.shape, dtype=t.dtype, device="meta")
