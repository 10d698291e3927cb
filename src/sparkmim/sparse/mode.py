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
``torch.compile``. What the handlers need of the forward pass (the masks, the grid, the error that
names the module, the tiles' geometry) is the mode's :class:`~.context.SparseContext`, which they
receive in its place.
"""

from __future__ import annotations

from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..masking import MaskPyramid
from . import algebra, reference
from .context import FastContext, SparseContext
from .fast import on_canvas
from .ops import KIND_OF, ON_CANVAS, PASS_THROUGH, REARRANGING, OpKind, tensors
from .table import Rule, resolve
from .tiles import SparseMap

__all__ = ["SparseMode", "FastSparseMode"]


class SparseMode(TorchFunctionMode):
    """Sparse semantics for one forward pass of one encoder, for one batch's masks (reference
    form); ``ctx`` is what the handlers receive."""

    def __init__(self, masks: MaskPyramid, path: list[tuple[str, str]] | None = None, sync_group=None,
                 patch: tuple[int, ...] | None = None):
        super().__init__()
        self.ctx: SparseContext = SparseContext(masks, path, sync_group, patch)

    # -- the encoder's input and outputs ------------------------------------------------------
    def wrap_input(self, x: Tensor) -> Tensor:
        """The model's input in this form."""
        return self.ctx.wrap_input(x)

    def dense_output(self, feature: Tensor, factor: tuple[int, ...]) -> Tensor:
        """A feature map as a dense tensor, zero at masked sites."""
        return self.ctx.dense_output(feature, factor)

    # -- dispatch --------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = resolve(func, args, kwargs)
        if found is not None:
            rule, func, args, kwargs = found
            return self.run_rule(rule, func, args, kwargs)
        return self.run_op(func, getattr(func, "__name__", None), args, kwargs)

    def run_rule(self, rule: Rule, func, args, kwargs):
        return rule.reference(self.ctx, func, *args, **kwargs)

    def run_op(self, func, name, args, kwargs):
        kind = KIND_OF.get(name)
        if kind in PASS_THROUGH:
            return func(*args, **kwargs)
        if kind in REARRANGING:
            return reference.rearrange(self.ctx, func, args, kwargs)
        if kind is OpKind.REDUCTION:
            return reference.reduce(self.ctx, func, name, args, kwargs)
        return reference.refuse_unknown(self.ctx, func, args, kwargs)


class FastSparseMode(SparseMode):
    """Sparse semantics computed at visible sites only: maps on the grid are held as :class:`SparseMap` tiles."""

    def __init__(self, masks: MaskPyramid, path=None, sync_group=None, patch: tuple[int, ...] | None = None,
                 constants: dict | None = None):
        TorchFunctionMode.__init__(self)
        self.ctx: FastContext = FastContext(masks, path, sync_group, patch, constants)

    # -- dispatch --------------------------------------------------------------------------
    def run_rule(self, rule: Rule, func, args, kwargs):
        if rule.fast is not None:
            out = rule.fast(self.ctx, func, *args, **kwargs)
            if out is not ON_CANVAS:
                return out
        return on_canvas(self.ctx, rule.reference, func, *args, fill=rule.fill, **kwargs)

    def run_op(self, func, name, args, kwargs):
        ctx = self.ctx
        kind = KIND_OF.get(name)
        lead = next(tensors(args, kwargs, SparseMap), None)
        if lead is None:  # dense tensors only: a reduction of a dense map on the grid runs on its tiles
            if kind is OpKind.REDUCTION and args and ctx.factor_of(args[0]) is not None:
                return algebra.reduce(ctx, func, name, (ctx.as_tiles(args[0]), *args[1:]), kwargs)
            return super().run_op(func, name, args, kwargs)
        translate = algebra.ON_TILES.get(kind)
        if translate is None:
            ctx.fail(func, lead, "is not known to have a sparse meaning")
        return translate(ctx, func, name, args, kwargs)
