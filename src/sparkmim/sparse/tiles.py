"""Feature maps held as their visible tiles: :class:`SparseMap`, its :class:`Geometry`, halos.

Every sample keeps the same number ``K`` of visible patches. At a map with ``f`` sites per patch
along each spatial axis (``f x f`` for images, ``fd x fh x fw`` for volumes and clips), each
visible patch is a tile, and a map of logical shape ``(B, *c_before, *spatial, *c_after)`` is held
as its tiles ``(B*K, *c_before, *f, *c_after)``. Logical dims and tile dims correspond one to one
(sample to sample-and-patch, each spatial axis to that axis of a tile), so most operations on a
map are the same operation, with the same arguments, on its tiles: a layer computes visible
sites only, with the dense network's own kernels and about as many operations. Spatial layers
read a tile with its halo (:meth:`Geometry.halo_index`), gathered from the neighbouring visible
tiles. Tiles are ordered sample by sample, and patch by patch (ascending patch index) within a
sample; all shapes are static, and the index tensors are built once per batch on the mask's
device without host synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..masking import MaskPyramid
from ..norms import memory_format_of
from .ops import SparseSemanticsError

__all__ = ["Patches", "Geometry", "SparseMap", "supports_fast", "to_dense", "to_tiles", "scatter", "replace_maps", "meta_like"]


def supports_fast(masks: MaskPyramid) -> bool:
    """The fast form needs the same number of visible patches in every sample."""
    return masks.keep is not None


class Patches:
    """The visible patches of one batch: for tile ``t``, its ``sample`` and its position on the
    grid along each axis, ``coords`` (each ``(B*K,)``; for images row and column), the same
    as ``(B*K, 1, ...)`` views with one trailing 1 per axis (``sample_v``, ``coords_v``), and
    ``slot`` ``(B, *grid)``: the tile number of each patch, ``B*K`` (the fill tile of a halo)
    where the patch is masked."""

    def __init__(self, masks: MaskPyramid):
        self.batch, self.grid, self.per_sample = masks.batch, masks.grid, masks.keep
        n = len(self.grid)
        ids = masks.visible_patch_ids()  # (B, K), ascending, row-major over the grid
        dev = ids.device
        self.count = self.batch * self.per_sample
        self.sample = torch.arange(self.count, device=dev).div(self.per_sample, rounding_mode="floor")
        coords, rest = [], ids
        for g in reversed(self.grid[1:]):  # the last axis varies fastest
            coords.insert(0, (rest % g).reshape(-1))
            rest = rest // g
        self.coords = (rest.reshape(-1), *coords)
        ones = (1,) * n
        self.sample_v = self.sample.view(-1, *ones)
        self.coords_v = tuple(c.view(-1, *ones) for c in self.coords)
        slot = torch.full((self.batch, math.prod(self.grid)), self.count, dtype=torch.long, device=dev)
        slot.scatter_(1, ids, torch.arange(self.count, device=dev).view(self.batch, self.per_sample))
        self.slot = slot.view(self.batch, *self.grid)
        self._padded: dict[tuple[int, int], Tensor] = {}

    def padded_slot(self, margin: int, scale: int) -> Tensor:
        """``slot * scale`` with ``margin`` masked patches added on every side (off-map reads the
        fill tile); index it with ``sample_v`` and ``coords_v`` (the tiles' positions) plus the
        patch offsets and ``margin``."""
        found = self._padded.get((margin, scale))
        if found is None:
            found = self._padded[(margin, scale)] = torch.nn.functional.pad(
                self.slot * scale, (margin,) * (2 * len(self.grid)), value=self.count * scale)
        return found


class Geometry:
    """Where the tiles of a map with ``factors`` sites per patch (one per axis, as
    :meth:`MaskPyramid.factor` gives them) sit, for one batch: the map is ``sizes`` sites,
    ``tiles`` of them per batch."""

    def __init__(self, patches: Patches, factors: tuple[int, ...], constants: dict | None = None):
        self.patches = patches
        self.constants = {} if constants is None else constants  # mask-independent index pieces, reusable
        self.batch, self.tiles = patches.batch, patches.count
        n = len(patches.grid)
        if len(factors) != n:
            raise ValueError(f"a geometry needs one factor per axis of the {n}-D grid, got {factors}")
        self.factors = tuple(factors)
        self.sizes = tuple(g * f for g, f in zip(patches.grid, self.factors))
        self.spatial_dims = n
        self.sites = math.prod(self.factors)  # per tile
        self._halo: dict[tuple, Tensor] = {}

    def index(self, spatial_dim: int) -> list:
        """The index of the visible tiles in a map viewed as ``(B, *c_before, g0, f0, g1, f1, ...)``
        (see :meth:`split_view`), for ``aten.index`` and ``aten.index_put`` (None: a whole dim).
        Its results take the dim order of the tensor indexed: channels-last maps give
        channels-last tiles, and the other way round, with no permutation."""
        p = self.patches
        index = [p.sample, *([None] * (spatial_dim - 1)), p.coords[0]]
        for c in p.coords[1:]:
            index += [None, c]
        return index

    def split_shape(self, shape, spatial_dim: int) -> tuple:
        """``shape`` (logical) with each spatial dim split into ``(patches, factor)``."""
        s, n = spatial_dim, self.spatial_dims
        split = [d for size, f in zip(shape[s: s + n], self.factors) for d in (size // f, f)]
        return (*shape[:s], *split, *shape[s + n:])

    def split_view(self, t: Tensor, spatial_dim: int) -> Tensor:
        """``t`` (logical layout) viewed with each spatial dim split into ``(patches, factor)``."""
        return t.view(self.split_shape(t.shape, spatial_dim))  # splitting a dim in two is always a view

    def halo_index(self, sizes: tuple[int, ...], starts: tuple[int, ...]) -> Tensor:
        """Where each site of every window of ``sizes`` sits, the window's corner being a visible
        patch's corner shifted back by ``starts`` along each axis: ``(B*K*prod(sizes),)`` indices
        into the tiles' sites as rows (tile by tile, row-major within a tile), followed by one
        fill row (number ``B*K*sites``) for masked and off-map sites."""
        key = (sizes, starts)
        found = self._halo.get(key)
        if found is None:
            p = self.patches
            margin, offsets, site = self._window_offsets(sizes, starts)
            slot = p.padded_slot(margin, self.sites)  # the first row of each tile's sites (fill: B*K*sites)
            tile_rows = slot[(p.sample_v, *(c + d for c, d in zip(p.coords_v, offsets)))]
            found = self._halo[key] = (tile_rows + site).clamp_max(p.count * self.sites).view(-1)
        return found

    def _window_offsets(self, sizes: tuple[int, ...], starts: tuple[int, ...]):
        """For a window of ``sizes`` whose corner is ``starts`` sites back from the patch corner:
        the patch margin it reaches beyond its own patch, for each axis the patch offset of each
        of its sites plus that margin (``(1, size, 1, ...)``-shaped views, one per axis), and each
        site's row within that patch ``(1, *sizes)``. They depend on no mask, so they are built
        once per device and kept in ``constants`` (the encoder's), never inside a captured step."""
        dev, n = self.patches.sample.device, self.spatial_dims
        key = (str(dev), self.factors, sizes, starts)
        found = self.constants.get(key)
        if found is None:
            margin, patch_offsets, site, step = 0, [], 0, self.sites
            for axis, (size, start, f) in enumerate(zip(sizes, starts, self.factors)):
                at = torch.arange(-start, size - start, device=dev)  # offsets from the patch corner
                shift = at.div(f, rounding_mode="floor")
                shape = [1] * (n + 1)
                shape[axis + 1] = size
                step //= f  # rows per site along this axis within a patch
                patch_offsets.append(shift.view(shape))
                site = site + ((at - shift * f) * step).view(shape)
                # patches a window reaches beyond its own, on any side (Python ints: no host read)
                margin = max(margin, start // f + (start % f > 0), (size - 1 - start) // f)
            found = self.constants[key] = (margin, tuple(o + margin for o in patch_offsets), site)
        return found


class SparseMap(Tensor):
    """A feature map on the mask grid that stores only its visible tiles.

    Its logical shape is ``(B, *c_before, *spatial, *c_after)`` (``spatial_dim`` is the index of
    the first spatial dim: ``ndim - 2`` for channels-first images, ``1`` for channels-last maps);
    ``tiles`` has shape ``(B*K, *c_before, *factors, *c_after)``. It exists only inside the fast sparse form, which
    translates every operation on it into operations on ``tiles``; autograd runs on ``tiles``.
    """

    tiles: Tensor
    geometry: Geometry
    spatial_dim: int

    @staticmethod
    def __new__(cls, tiles: Tensor, geometry: Geometry, spatial_dim: int):
        shape = list(tiles.shape)
        shape[0] = geometry.batch
        shape[spatial_dim: spatial_dim + geometry.spatial_dims] = geometry.sizes
        t = Tensor._make_wrapper_subclass(cls, shape, dtype=tiles.dtype, device=tiles.device)
        t.tiles, t.geometry, t.spatial_dim = tiles, geometry, spatial_dim
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise SparseSemanticsError(
            f"'{func}' was applied to a sparse feature map outside the sparse encoder's forward"
        )

    def __repr__(self) -> str:
        return f"SparseMap(shape={tuple(self.shape)}, tiles={tuple(self.tiles.shape)}, factor={self.geometry.factors})"

    def with_tiles(self, tiles: Tensor, spatial_dim: int | None = None) -> SparseMap:
        """A map of the same geometry (and layout, unless ``spatial_dim`` is given) holding ``tiles``."""
        return SparseMap(tiles, self.geometry, self.spatial_dim if spatial_dim is None else spatial_dim)

    def canvas(self, fill: float = 0.0) -> Tensor:
        """The dense logical tensor, ``fill`` at masked sites, in the tiles' memory format."""
        return scatter(self.tiles, self.geometry, tuple(self.shape), self.spatial_dim, fill)

    def halo(self, sizes: tuple[int, ...], starts: tuple[int, ...], fill: float = 0.0) -> Tensor:
        """``(B*K, C, *sizes)`` windows of a channels-first map around its visible tiles (see
        :meth:`Geometry.halo_index`), ``fill`` at masked and off-map sites, in the tiles' memory
        format (so the layer's output, and the gradients, keep the dense network's layout)."""
        t = self.tiles
        n, c, tile = t.shape[0], t.shape[1], t.shape[2:]
        if not any(starts) and all(s <= f for s, f in zip(sizes, tile)):
            return t[(slice(None), slice(None), *(slice(None, s) for s in sizes))]
        index = self.geometry.halo_index(tuple(sizes), tuple(starts))
        own = memory_format_of(t)
        if own is torch.contiguous_format and t.requires_grad:
            t = _GradientIn.apply(t, own)  # the gradient comes back as rows; give it the tiles' layout
        # gathered as rows of channel vectors (a view for channels-last tiles), with one fill row;
        # an embedding lookup is index_select with a one-operation backward (a scatter-add)
        d = t.dim()
        rows = torch.nn.functional.pad(t.permute(0, *range(2, d), 1).reshape(n * math.prod(tile), c), (0, 0, 0, 1),
                                       value=fill)
        windows = torch.nn.functional.embedding(index, rows).view(n, *sizes, c).permute(0, d - 1, *range(1, d - 1))
        return windows.contiguous(memory_format=own)


def _strides(shape, memory_format: torch.memory_format) -> list[int]:
    """The strides of a dense tensor of ``shape`` in ``memory_format`` (channels-last: the
    channel dim 1 innermost)."""
    last = memory_format in (torch.channels_last, torch.channels_last_3d)
    order = [0, *range(2, len(shape)), 1] if last else list(range(len(shape)))
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d], step = step, step * shape[d]
    return strides


def scatter(tiles: Tensor, geometry: Geometry, shape: tuple, spatial_dim: int, fill: float = 0.0,
            memory_format: torch.memory_format | None = None) -> Tensor:
    """A fresh dense tensor of logical ``shape``, ``fill`` at masked sites and ``tiles`` at the
    visible ones, in ``memory_format`` (default: the tiles'). Written out of place into a tensor
    made in the split layout: no permutation, and the backward is one gather of the gradient's
    tiles (an in-place write would add a copy of the canvas and four more operations)."""
    s, n = spatial_dim, geometry.spatial_dims
    st = _strides(shape, memory_format_of(tiles) if memory_format is None else memory_format)
    split = [d for stride, f in zip(st[s: s + n], geometry.factors) for d in (stride * f, stride)]
    split_strides = (*st[:s], *split, *st[s + n:])
    base = tiles.new_empty_strided(geometry.split_shape(shape, s), split_strides).fill_(fill)
    return torch.ops.aten.index_put(base, geometry.index(s), tiles).view(shape)


class _Gather(torch.autograd.Function):
    """The visible tiles of a dense map (in its dim order); the backward scatters the gradient's
    tiles into zeros laid out as the map was (two operations and a fill, no permutation)."""

    @staticmethod
    def forward(ctx, dense: Tensor, geometry: Geometry, spatial_dim: int) -> Tensor:
        ctx.geometry, ctx.spatial_dim, ctx.shape = geometry, spatial_dim, tuple(dense.shape)
        ctx.memory_format = memory_format_of(dense)
        return torch.ops.aten.index(geometry.split_view(dense, spatial_dim), geometry.index(spatial_dim))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return scatter(grad, ctx.geometry, ctx.shape, ctx.spatial_dim, 0.0, ctx.memory_format), None, None


class _GradientIn(torch.autograd.Function):
    """The identity, whose gradient is given ``memory_format``."""

    @staticmethod
    def forward(ctx, t: Tensor, memory_format: torch.memory_format) -> Tensor:
        ctx.memory_format = memory_format
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.contiguous(memory_format=ctx.memory_format), None


def to_dense(t):
    """A plain tensor for ``t``: a SparseMap becomes its dense map (zero at masked sites), other
    values are returned unchanged. Safe to call in forward hooks inside the sparse forward."""
    if not isinstance(t, SparseMap):
        return t
    with torch._C.DisableTorchFunction():
        return t.canvas()


def to_tiles(t: Tensor, geometry: Geometry, spatial_dim: int) -> SparseMap:
    """Gather the visible tiles of a dense tensor laid out like a map at ``geometry`` (tiles in
    its dim order: channels-last tiles from a channels-last ``(B, C, H, W)`` map)."""
    return SparseMap(_Gather.apply(t, geometry, spatial_dim), geometry, spatial_dim)


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
