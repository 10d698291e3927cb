"""The choice of sparse form for one forward pass, and the conversions at its two ends."""

from __future__ import annotations

import torch
from torch import Tensor

from ..masking import MaskPyramid
from ..norms import like_format
from .mode import FastSparseMode, SparseMode
from .tiles import supports_fast

__all__ = ["SPARSE_IMPLS", "SparseForm", "sparse_form"]

SPARSE_IMPLS = ("fast", "reference")


class SparseForm:
    """One forward pass in one sparse form: a context manager inside which the form's mode is
    active, with :meth:`enter` for the model's input and :meth:`exit` for each feature map."""

    def __init__(self, mode: SparseMode):
        self.mode = mode
        self._images: Tensor | None = None

    @property
    def fast(self) -> bool:
        return isinstance(self.mode, FastSparseMode)

    def __enter__(self) -> SparseForm:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    def enter(self, images: Tensor) -> Tensor:
        """The masked images ``(B, C, H, W)`` as the model receives them in this form."""
        self._images = images
        return self.mode.wrap_input(images)

    def exit(self, feature: Tensor, factor: tuple[int, ...]) -> Tensor:
        """A feature map at ``factor`` sites per patch (one per axis) as a dense tensor, zero at masked
        sites, in the images' memory format. Call it after the ``with`` block."""
        return like_format(self.mode.dense_output(feature, factor), self._images)


def sparse_form(impl: str, masks: MaskPyramid, sync_group=None, path: list[tuple[str, str]] | None = None,
                constants: dict | None = None, patch: tuple[int, ...] | None = None) -> SparseForm:
    """The sparse form for one forward pass: ``impl="fast"`` holds feature maps as their visible
    tiles, unless the masks keep a different number of patches per sample or the forward is being
    traced by ``torch.compile``, which use the reference form (dense, then mask), as does
    ``impl="reference"``.

    ``sync_group``: process group for batch statistics across ranks (None: this process).
    ``path``: a live (module name, type) stack, so errors name the module (build-time checks).
    ``constants``: a dict the fast form keeps its mask-independent index pieces in, to reuse
    across forwards (the encoder's).
    ``patch``: the patch size per axis (the encoder's total stride); axes of equal patch size
    must have equal sites per patch for a map to be read as lying on the grid (see
    :meth:`SparseMode.on_grid`)."""
    if impl not in SPARSE_IMPLS:
        raise ValueError(f"sparse_impl must be one of {SPARSE_IMPLS}, got {impl!r}")
    fast = impl == "fast" and supports_fast(masks) and not torch.compiler.is_compiling()
    mode = FastSparseMode(masks, path, sync_group, patch, constants) if fast else SparseMode(masks, path, sync_group, patch)
    return SparseForm(mode)
