"""Feature maps held as their visible tiles: :class:`SparseMap`, its :class:`Geometry`, halos.

Every sample keeps the same number ``K`` of visible patches. At a map with ``f x f`` sites per
patch, each visible patch is an ``f x f`` tile, and a map of logical shape ``(B, *c_before, H,
W, *c_after)`` is held as its tiles ``(B*K, *c_before, f, f, *c_after)``. Logical dims and tile
dims correspond one to one (sample to sample-and-patch, ``H`` to the rows of a tile, ``W`` to
its columns), so most operations on a map are the same operation, with the same arguments, on
its tiles: a layer computes visible sites only, with the dense network's own kernels and about
as many operations. Spatial layers read a tile with its halo (:meth:`Geometry.halo_index`),
gathered from the neighbouring visible tiles. Tiles are ordered sample by sample, and patch by
patch (ascending patch index) within a sample; all shapes are static, and the index tensors are
built once per batch on the mask's device without host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..masking import MaskPyramid
from ..norms import memory_format_of
from .ops import SparseSemanticsError

__all__ = ["Patches", "Geometry", "SparseMap", "supports_fast", "to_dense", "to_tiles", "scatter", "replace_maps", "meta_like"]


def supports_fast(masks: MaskPyramid) -> bool:
    """The fast form needs the same number of visible patches in every sample, and 2-D maps (3-D
    maps use the reference form for now)."""
    return masks.keep is not None and masks.spatial_dims == 2


class Patches:
    """The visible patches of one batch: for tile ``t``, its ``sample``, grid ``row`` and ``col``
    (each ``(B*K,)``, and as ``(B*K, 1, 1)`` views ``sample3``, ``row3``, ``col3``), and ``slot``
    ``(B, h, w)``: the tile number of each patch, ``B*K`` (the fill tile of a halo) where the
    patch is masked."""

    def __init__(self, masks: MaskPyramid):
        self.batch, self.grid_height, self.grid_width, self.per_sample = masks.batch, masks.h, masks.w, masks.keep
        ids = masks.visible_patch_ids()  # (B, K), ascending
        dev = ids.device
        self.count = self.batch * self.per_sample
        self.sample = torch.arange(self.count, device=dev).div(self.per_sample, rounding_mode="floor")
        self.row, self.col = (ids // self.grid_width).reshape(-1), (ids % self.grid_width).reshape(-1)
        self.sample3, self.row3, self.col3 = self.sample.view(-1, 1, 1), self.row.view(-1, 1, 1), self.col.view(-1, 1, 1)
        slot = torch.full((self.batch, self.grid_height * self.grid_width), self.count, dtype=torch.long, device=dev)
        slot.scatter_(1, ids, torch.arange(self.count, device=dev).view(self.batch, self.per_sample))
        self.slot = slot.view(self.batch, self.grid_height, self.grid_width)
        self._padded: dict[tuple[int, int], Tensor] = {}

    def padded_slot(self, margin: int, scale: int) -> Tensor:
        """``slot * scale`` with ``margin`` masked patches added on every side (off-map reads the
        fill tile); index it with ``sample3`` and ``row3``, ``col3`` (the tiles' ``(B*K, 1, 1)``
        positions) plus the patch offsets and ``margin``."""
        found = self._padded.get((margin, scale))
        if found is None:
            found = self._padded[(margin, scale)] = torch.nn.functional.pad(self.slot * scale, (margin,) * 4,
                                                                            value=self.count * scale)
        return found


class Geometry:
    """Where the tiles of a map with ``factor x factor`` sites per patch sit, for one batch: the
    map is ``height x width`` sites, ``tiles`` of them per batch."""

    def __init__(self, patches: Patches, factor: int, constants: dict | None = None):
        self.patches, self.factor = patches, factor
        self.constants = {} if constants is None else constants  # mask-independent index pieces, reusable
        self.batch, self.tiles = patches.batch, patches.count
        self.height, self.width = patches.grid_height * factor, patches.grid_width * factor
        self._halo: dict[tuple[int, int, int, int], Tensor] = {}

    def index(self, spatial_dim: int) -> list:
        """The index of the visible tiles in a map viewed as ``(B, *c_before, h, f, w, f, ...)``
        (see :meth:`split_view`), for ``aten.index`` and ``aten.index_put`` (None: a whole dim).
        Its results take the dim order of the tensor indexed: channels-last maps give
        channels-last tiles, and the other way round, with no permutation."""
        p = self.patches
        return [p.sample, *([None] * (spatial_dim - 1)), p.row, None, p.col]

    def split_shape(self, shape, spatial_dim: int) -> tuple:
        """``shape`` (logical) with each spatial dim split into ``(patches, factor)``."""
        s, f = spatial_dim, self.factor
        return (*shape[:s], shape[s] // f, f, shape[s + 1] // f, f, *shape[s + 2:])

    def split_view(self, t: Tensor, spatial_dim: int) -> Tensor:
        """``t`` (logical layout) viewed with each spatial dim split into ``(patches, factor)``."""
        return t.view(self.split_shape(t.shape, spatial_dim))  # splitting a dim in two is always a view

    def halo_index(self, tile_height: int, tile_width: int, top: int, left: int) -> Tensor:
        """Where each site of every ``tile_height x tile_width`` window sits, the window's corner
        being a visible patch's corner shifted by ``(-top, -left)``: ``(B*K*th*tw,)`` indices into
        the tiles' sites as rows (tile by tile, row-major within a tile), followed by one fill
        row (number ``B*K*f*f``) for masked and off-map sites."""
        key = (tile_height, tile_width, top, left)
        found = self._halo.get(key)
        if found is None:
            p, f = self.patches, self.factor
            margin, dy, dx, site = self._window_offsets(tile_height, tile_width, top, left)
            slot = p.padded_slot(margin, f * f)  # the first row of each tile's sites (fill: B*K*f*f)
            tile_rows = slot[p.sample3, p.row3 + dy, p.col3 + dx]
            found = self._halo[key] = (tile_rows + site).clamp_max(p.count * f * f).view(-1)
        return found

    def _window_offsets(self, tile_height: int, tile_width: int, top: int, left: int):
        """For a window of the given size whose corner is ``(-top, -left)`` from the patch corner:
        the patch margin it reaches beyond its own patch, and for each of its sites the patch
        offset plus that margin, ``dy (1, th, 1)`` and ``dx (1, 1, tw)``, and the site's row
        within that patch ``(1, th, tw)``. They depend on no mask, so they are built once per device and kept in
        ``constants`` (the encoder's), never inside a captured step."""
        f, dev = self.factor, self.patches.row.device
        key = (str(dev), f, tile_height, tile_width, top, left)
        found = self.constants.get(key)
        if found is None:
            ys = torch.arange(-top, tile_height - top, device=dev)  # offsets from the patch corner
            xs = torch.arange(-left, tile_width - left, device=dev)
            dy, dx = ys.div(f, rounding_mode="floor"), xs.div(f, rounding_mode="floor")
            site = ((ys - dy * f) * f).view(1, -1, 1) + (xs - dx * f).view(1, 1, -1)
            # patches a window reaches beyond its own, on any side (Python ints: no host read)
            margin = max(0, top // f + (top % f > 0), (tile_height - 1 - top) // f,
                         left // f + (left % f > 0), (tile_width - 1 - left) // f)
            found = self.constants[key] = (margin, (dy + margin).view(1, -1, 1), (dx + margin).view(1, 1, -1), site)
        return found


class SparseMap(Tensor):
    """A feature map on the mask grid that stores only its visible tiles.

    Its logical shape is ``(B, *c_before, H, W, *c_after)`` (``spatial_dim`` is the index of
    ``H``: ``ndim - 2`` for channels-first maps, ``1`` for channels-last ones); ``tiles`` has
    shape ``(B*K, *c_before, f, f, *c_after)``. It exists only inside the fast sparse form, which
    translates every operation on it into operations on ``tiles``; autograd runs on ``tiles``.
    """

    tiles: Tensor
    geometry: Geometry
    spatial_dim: int

    @staticmethod
    def __new__(cls, tiles: Tensor, geometry: Geometry, spatial_dim: int):
        shape = list(tiles.shape)
        shape[0], shape[spatial_dim], shape[spatial_dim + 1] = geometry.batch, geometry.height, geometry.width
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
        return f"SparseMap(shape={tuple(self.shape)}, tiles={tuple(self.tiles.shape)}, factor={self.geometry.factor})"

    def with_tiles(self, tiles: Tensor, spatial_dim: int | None = None) -> SparseMap:
        """A map of the same geometry (and layout, unless ``spatial_dim`` is given) holding ``tiles``."""
        return SparseMap(tiles, self.geometry, self.spatial_dim if spatial_dim is None else spatial_dim)

    def canvas(self, fill: float = 0.0) -> Tensor:
        """The dense logical tensor, ``fill`` at masked sites, in the tiles' memory format."""
        return scatter(self.tiles, self.geometry, tuple(self.shape), self.spatial_dim, fill)

    def halo(self, tile_height: int, tile_width: int, top: int, left: int, fill: float = 0.0) -> Tensor:
        """``(B*K, C, th, tw)`` windows of a channels-first map around its visible tiles (see
        :meth:`Geometry.halo_index`), ``fill`` at masked and off-map sites, in the tiles' memory
        format (so the layer's output, and the gradients, keep the dense network's layout)."""
        t = self.tiles
        n, c, f, _ = t.shape
        if top == left == 0 and tile_height <= f and tile_width <= f:
            return t[:, :, :tile_height, :tile_width]
        index = self.geometry.halo_index(tile_height, tile_width, top, left)
        own = memory_format_of(t)
        if own is torch.contiguous_format and t.requires_grad:
            t = _GradientIn.apply(t, own)  # the gradient comes back as rows; give it the tiles' layout
        # gathered as rows of channel vectors (a view for channels-last tiles), with one fill row;
        # an embedding lookup is index_select with a one-operation backward (a scatter-add)
        rows = torch.nn.functional.pad(t.permute(0, 2, 3, 1).reshape(n * f * f, c), (0, 0, 0, 1), value=fill)
        windows = torch.nn.functional.embedding(index, rows).view(n, tile_height, tile_width, c).permute(0, 3, 1, 2)
        return windows.contiguous(memory_format=own)


def _strides(shape, memory_format: torch.memory_format) -> list[int]:
    """The strides of a dense tensor of ``shape`` in ``memory_format`` (channels-last: the
    channel dim 1 innermost)."""
    order = [0, *range(2, len(shape)), 1] if memory_format is torch.channels_last else list(range(len(shape)))
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
    s, f = spatial_dim, geometry.factor
    st = _strides(shape, memory_format_of(tiles) if memory_format is None else memory_format)
    split_strides = (*st[:s], st[s] * f, st[s], st[s + 1] * f, st[s + 1], *st[s + 2:])
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
