"""What the handlers of one sparse forward pass need, and nothing of the dispatch: the batch's
masks and the questions asked of them (is this map on the grid, at which sites per patch, its
visible-site mask), the error that names the failing module, the process group of batch
statistics, and for the fast form the tiles' geometries and the conversion of dense maps to tiles.

The modes (:mod:`.mode`) hold a context and hand it to the handlers (:mod:`.reference`,
:mod:`.algebra`, :mod:`.fast`), which never see the mode that dispatched them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..masking import MaskPyramid
from .ops import SparseSemanticsError
from .tiles import Geometry, Patches, SparseMap, supports_fast, to_tiles

__all__ = ["SparseContext", "FastContext", "TILE_FORMAT"]


class SparseContext:
    """One forward pass of one encoder, for one batch's masks, in the reference form (maps dense,
    zero at masked sites)."""

    def __init__(self, masks: MaskPyramid, path: list[tuple[str, str]] | None = None, sync_group=None,
                 patch: tuple[int, ...] | None = None):
        self.masks = masks
        self.sync_group = sync_group  # process group for batch statistics across ranks, or None
        self.batch = masks.batch
        self.spatial_dims = masks.spatial_dims  # 2 (images) or 3 (volumes, clips)
        self.path = path  # (module name, type) stack, kept only while probing a model at build time
        # axes whose patch sizes are equal: a map on the grid has the same sites per patch along them
        self._tied = [] if patch is None else [(i, j) for i in range(len(patch)) for j in range(i + 1, len(patch))
                                                if patch[i] == patch[j]]

    # -- layout helpers -------------------------------------------------------------------
    def on_grid(self, factor: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """``factor`` if a map with these sites per patch lies on the grid, else None: along axes
        of equal patch size the factors must agree (a square patch has square tiles). This keeps
        a channels-last tensor ``(B, H, W, C)`` from being read as a channels-first map whose
        last axes happen to be multiples of the grid."""
        if factor is None or any(factor[i] != factor[j] for i, j in self._tied):
            return None
        return factor

    def factor_of(self, t):
        """Sites per patch of a channels-first map ``(B, ..., *spatial)`` on the mask grid (one per
        axis; see :meth:`MaskPyramid.factor` and :meth:`on_grid`), else None."""
        n = self.spatial_dims
        if not isinstance(t, Tensor) or t.dim() < n + 1 or t.shape[0] != self.batch:
            return None
        return self.on_grid(self.masks.factor(*t.shape[-n:]))

    def factor_of_channels_last(self, t):
        """Sites per patch of a channels-last map ``(B, *spatial, C)`` on the mask grid, else None."""
        n = self.spatial_dims
        if not isinstance(t, Tensor) or t.dim() != n + 2 or t.shape[0] != self.batch:
            return None
        return self.on_grid(self.masks.factor(*t.shape[1: n + 1]))

    def mask_for(self, t: Tensor, factor) -> Tensor:
        """The visible-site mask at ``factor``, broadcastable to the channels-first map ``t``."""
        m = self.masks.at(factor)
        if t.dim() == self.spatial_dims + 2:
            return m
        return m.view(self.batch, *([1] * (t.dim() - self.spatial_dims - 1)), *m.shape[2:])

    def mask_channels_last(self, factor) -> Tensor:
        """The visible-site mask at ``factor`` as ``(B, *spatial, 1)``."""
        return self.masks.at(factor).movedim(1, -1)

    def mask_input(self, x):
        """``x`` with zeros at masked sites if it is a channels-first map on the grid."""
        f = self.factor_of(x)
        return x if f is None else torch.where(self.mask_for(x, f), x, 0.0)

    def mask_output(self, out, func):
        """A layer's output, zero at masked sites; refused if it is a map that left the grid."""
        if isinstance(out, (tuple, list)):
            return type(out)([self.mask_output(out[0], func), *out[1:]])
        f = self.factor_of(out)
        if f is not None:
            return torch.where(self.mask_for(out, f), out, 0.0)
        n = self.spatial_dims
        if isinstance(out, Tensor) and out.dim() == n + 2 and out.shape[0] == self.batch \
                and math.prod(out.shape[-n:]) > 1:
            self.fail(func, out, "produces a feature map whose size is not a multiple of the patch grid")
        return out

    def fail(self, func, t, why: str):
        """Raise :class:`SparseSemanticsError` naming the operation, the module and the shape."""
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        where = f" in module '{self.path[-1][0]}' ({self.path[-1][1]})" if self.path else ""
        shape = tuple(t.shape) if isinstance(t, Tensor) else t
        raise SparseSemanticsError(
            f"operation '{name}'{where} on a tensor of shape {shape} {why}; the sparse encoder cannot "
            f"apply it without letting masked positions leak. See docs/backbones.md."
        )

    # -- the encoder's input and outputs ------------------------------------------------------
    def wrap_input(self, x: Tensor) -> Tensor:
        """The model's input in this form (the masked images themselves)."""
        return x

    def dense_output(self, feature: Tensor, factor: tuple[int, ...]) -> Tensor:
        """A feature map as a dense tensor, zero at masked sites."""
        return torch.where(self.mask_for(feature, factor), feature, 0.0)


TILE_FORMAT = {4: torch.channels_last}
"""The memory format of the input's tiles, by tile rank. Image tiles are channels-last: on small
tiles the channels-first kernels of batch norm are several times slower (CPU: 8.4 ms against 1.3
ms forward and backward for 160 tiles of 2 x 2 x 1024), and GPUs prefer channels-last. Volume
tiles stay contiguous (channels-last-3d is not measured for them)."""


class FastContext(SparseContext):
    """The fast form: maps on the grid are held as :class:`SparseMap` tiles (their visible sites)."""

    def __init__(self, masks: MaskPyramid, path=None, sync_group=None, patch: tuple[int, ...] | None = None,
                 constants: dict | None = None):
        if not supports_fast(masks):
            raise ValueError("the fast sparse form needs the same number of visible patches in every sample")
        super().__init__(masks, path, sync_group, patch)
        self._patches: Patches | None = None
        self._constants = {} if constants is None else constants
        self._geometries: dict[tuple[int, ...], Geometry] = {}

    def geometry(self, factor: tuple[int, ...]) -> Geometry:
        """Where the tiles of maps at ``factor`` (one per axis) sit (built once per forward)."""
        g = self._geometries.get(factor)
        if g is None:
            if self._patches is None:
                self._patches = Patches(self.masks)
            g = self._geometries[factor] = Geometry(self._patches, factor, self._constants)
        return g

    # -- conversions -----------------------------------------------------------------------
    def wrap_input(self, x: Tensor) -> SparseMap:
        """The input's visible tiles, in the layout of ``TILE_FORMAT``; every layer keeps it."""
        with torch._C.DisableTorchFunction():  # this mode may be active: build the indices undisturbed
            m = to_tiles(x, self.geometry(self.factor_of(x)), x.dim() - self.spatial_dims)
            layout = TILE_FORMAT.get(m.tiles.dim())
            return m if layout is None else m.with_tiles(m.tiles.contiguous(memory_format=layout))

    def as_tiles(self, t):
        """A dense channels-first map on the grid as a SparseMap (its masked sites dropped);
        anything else unchanged."""
        if isinstance(t, Tensor) and not isinstance(t, SparseMap):
            f = self.factor_of(t)
            if f is not None:
                return to_tiles(t, self.geometry(f), t.dim() - self.spatial_dims)
        return t

    def dense_output(self, feature: Tensor, factor: tuple[int, ...]) -> Tensor:
        if isinstance(feature, SparseMap):
            with torch._C.DisableTorchFunction():  # this mode may be active: scatter undisturbed
                return feature.canvas()
        return super().dense_output(feature, self.factor_of(feature) or factor)  # a map a layer left dense
