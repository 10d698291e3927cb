"""The two sparse forms as torch function modes: dispatch only.

While a mode is active (only inside ``SparseEncoder.forward``), every torch operation the model
performs passes through ``__torch_function__``. Feature maps "on the mask grid" (spatial size a
whole multiple of the patch grid, batch size of the mask) are sparse: masked sites are absent.
A call is resolved in this order:

1. a layer with a spatial or statistical meaning: its :class:`~.table.Rule` from the one
   registry (lower-level spellings are first rewritten to the ``torch.nn.functional`` one);
2. any other operation by its kind (:data:`~.ops.KIND_OF`);
3. anything else that computes a tensor from a map raises :class:`~.ops.SparseSemanticsError`
   naming the operation and the module, so a model the converter does not understand is never
   run with a silent leak.

:class:`SparseMode` is the reference form (dense, then mask: :mod:`.reference`).
:class:`FastSparseMode` holds maps as their visible tiles (:class:`~.tiles.SparseMap`) and runs
the fast handlers (:mod:`.fast`) and the tensor algebra on tiles (:mod:`.algebra`); tensors not
on the grid (a pooled ``1 x 1`` vector in a squeeze-excitation block, a weight being
standardised) are dense in both and pass through untouched. No state outside the mode instance
is used, so encoders can run concurrently, and the reference mode is traceable by
``torch.compile``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..masking import MaskPyramid
from . import algebra, reference
from .fast import on_canvas
from .ops import KIND_OF, ON_CANVAS, PASS_THROUGH, REARRANGING, OpKind, SparseSemanticsError, tensors
from .table import Rule, resolve
from .tiles import Geometry, Patches, SparseMap, supports_fast, to_tiles

__all__ = ["SparseMode", "FastSparseMode"]


class SparseMode(TorchFunctionMode):
    """Sparse semantics for one forward pass of one encoder, for one batch's masks (reference form)."""

    def __init__(self, masks: MaskPyramid, path: list[tuple[str, str]] | None = None, sync_group=None):
        super().__init__()
        self.masks = masks
        self.sync_group = sync_group  # process group for batch statistics across ranks, or None
        self.batch = masks.batch
        self.spatial_dims = masks.spatial_dims  # 2 (images) or 3 (volumes, clips)
        self.path = path  # (module name, type) stack, kept only while probing a model at build time

    # -- layout helpers -------------------------------------------------------------------
    def factor_of(self, t):
        """Sites per patch of a channels-first map ``(B, ..., *spatial)`` on the mask grid (an int
        for 2-D masks, one per axis for 3-D ones; see :meth:`MaskPyramid.factor`), else None."""
        n = self.spatial_dims
        if not isinstance(t, Tensor) or t.dim() < n + 1 or t.shape[0] != self.batch:
            return None
        return self.masks.factor(*t.shape[-n:])

    def factor_of_channels_last(self, t):
        """Sites per patch of a channels-last map ``(B, *spatial, C)`` on the mask grid, else None."""
        n = self.spatial_dims
        if not isinstance(t, Tensor) or t.dim() != n + 2 or t.shape[0] != self.batch:
            return None
        return self.masks.factor(*t.shape[1: n + 1])

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
            f"apply it without letting masked positions leak. See the README section 'Supported backbones'."
        )

    # -- the encoder's input and outputs ------------------------------------------------------
    def wrap_input(self, x: Tensor) -> Tensor:
        """The model's input in this form (the masked images themselves)."""
        return x

    def dense_output(self, feature: Tensor, factor: int) -> Tensor:
        """A feature map as a dense tensor, zero at masked sites."""
        return torch.where(self.mask_for(feature, factor), feature, 0.0)

    # -- dispatch --------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = resolve(func, args, kwargs)
        if found is not None:
            rule, func, args, kwargs = found
            return self.run_rule(rule, func, args, kwargs)
        return self.run_op(func, getattr(func, "__name__", None), args, kwargs)

    def run_rule(self, rule: Rule, func, args, kwargs):
        return rule.reference(self, func, *args, **kwargs)

    def run_op(self, func, name, args, kwargs):
        kind = KIND_OF.get(name)
        if kind in PASS_THROUGH:
            return func(*args, **kwargs)
        if kind in REARRANGING:
            return reference.rearrange(self, func, args, kwargs)
        if kind is OpKind.REDUCTION:
            return reference.reduce(self, func, name, args, kwargs)
        return reference.refuse_unknown(self, func, args, kwargs)


class FastSparseMode(SparseMode):
    """Sparse semantics computed at visible sites only: maps on the grid are :class:`SparseMap`s."""

    def __init__(self, masks: MaskPyramid, path=None, sync_group=None, constants: dict | None = None):
        if not supports_fast(masks):
            raise ValueError("the fast sparse form needs the same number of visible patches in every sample")
        super().__init__(masks, path, sync_group)
        self._patches: Patches | None = None
        self._constants = {} if constants is None else constants
        self._geometries: dict[int, Geometry] = {}

    def geometry(self, factor) -> Geometry:
        """Where the tiles of maps at ``factor`` sit (an int for images, one per axis for volumes;
        built once per forward)."""
        g = self._geometries.get(factor)
        if g is None:
            if self._patches is None:
                self._patches = Patches(self.masks)
            g = self._geometries[factor] = Geometry(self._patches, factor, self._constants)
        return g

    # -- conversions -----------------------------------------------------------------------
    def wrap_input(self, x: Tensor) -> SparseMap:
        """The images' visible tiles, channels-last: on small tiles the channels-first kernels of
        batch norm are several times slower (CPU: 8.4 ms against 1.3 ms forward and backward for
        160 tiles of 2 x 2 x 1024), and GPUs prefer channels-last; every layer keeps the layout."""
        with torch._C.DisableTorchFunction():  # this mode may be active: build the indices undisturbed
            m = to_tiles(x, self.geometry(self.factor_of(x)), x.dim() - self.spatial_dims)
            if m.tiles.dim() == 4:
                m = m.with_tiles(m.tiles.contiguous(memory_format=torch.channels_last))
            return m

    def as_tiles(self, t):
        """A dense channels-first map on the grid as a SparseMap (its masked sites dropped);
        anything else unchanged."""
        if isinstance(t, Tensor) and not isinstance(t, SparseMap):
            f = self.factor_of(t)
            if f is not None:
                return to_tiles(t, self.geometry(f), t.dim() - self.spatial_dims)
        return t

    def dense_output(self, feature: Tensor, factor: int) -> Tensor:
        if isinstance(feature, SparseMap):
            with torch._C.DisableTorchFunction():  # this mode may be active: scatter undisturbed
                return feature.canvas()
        return super().dense_output(feature, self.factor_of(feature) or factor)  # a map a layer left dense

    # -- dispatch --------------------------------------------------------------------------
    def run_rule(self, rule: Rule, func, args, kwargs):
        if rule.fast is not None:
            out = rule.fast(self, func, *args, **kwargs)
            if out is not ON_CANVAS:
                return out
        return on_canvas(self, rule.reference, func, *args, fill=rule.fill, **kwargs)

    def run_op(self, func, name, args, kwargs):
        kind = KIND_OF.get(name)
        lead = next(tensors(args, kwargs, SparseMap), None)
        if lead is None:  # dense tensors only: a reduction of a dense map on the grid runs on its tiles
            if kind is OpKind.REDUCTION and args and self.factor_of(args[0]) is not None:
                return algebra.reduce(self, func, name, (self.as_tiles(args[0]), *args[1:]), kwargs)
            return super().run_op(func, name, args, kwargs)
        translate = algebra.ON_TILES.get(kind)
        if translate is None:
            self.fail(func, lead, "is not known to have a sparse meaning")
        return translate(self, func, name, args, kwargs)
