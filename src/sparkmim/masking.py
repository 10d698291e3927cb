"""Patch-wise random masks and their views at every feature stride.

A mask is a boolean tensor ``visible`` of shape ``(B, 1, h, w)`` on the patch grid, where
``h = H / P`` and ``w = W / P`` for images of ``H x W`` pixels and patch size ``P`` (the
encoder's total stride). ``True`` marks a kept (visible) patch.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["grid_size", "check_mask_ratio", "num_visible", "random_visible", "MaskPyramid", "seed_for"]


def seed_for(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (a run's seed, an epoch, a step, ...), for
    random numbers that must come out the same after a resume, in any process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def grid_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Return the patch grid ``(h, w)`` of an ``height x width`` image, or raise a clear error."""
    if patch_size < 1:
        raise ValueError(f"patch size must be a positive integer, got {patch_size}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"input size {height}x{width} is not a multiple of the patch size {patch_size} "
            f"(the encoder's total stride); resize or crop to e.g. "
            f"{max(1, round(height / patch_size)) * patch_size}x{max(1, round(width / patch_size)) * patch_size}"
        )
    h, w = height // patch_size, width // patch_size
    if h * w < 2:
        raise ValueError(
            f"input size {height}x{width} holds a single {patch_size}px patch; masked modeling needs at "
            f"least 2 patches (use an input of at least {patch_size}x{2 * patch_size})"
        )
    return h, w


def check_mask_ratio(mask_ratio: float) -> float:
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be strictly between 0 and 1, got {mask_ratio}")
    return mask_ratio


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Number of kept patches per sample, ``round(L * (1 - ratio))``, at least 1 and at most L - 1."""
    check_mask_ratio(mask_ratio)
    keep = round(num_patches * (1.0 - mask_ratio))
    return min(max(keep, 1), num_patches - 1)


def random_visible(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float = 0.6,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw per-sample random masks with exactly ``num_visible`` kept patches each.

    Returns a bool tensor ``(batch, 1, h, w)``. The draw happens on ``device`` (or the
    generator's device), so no host synchronisation is needed on accelerators.
    """
    h, w = grid
    n = h * w
    keep = num_visible(n, mask_ratio)
    if generator is not None:
        device = generator.device
    noise = torch.rand(batch, n, generator=generator, device=device)
    kept = noise.argsort(dim=1)[:, :keep]
    visible = torch.zeros(batch, n, dtype=torch.bool, device=noise.device)
    visible.scatter_(1, kept, True)
    return visible.view(batch, 1, h, w)


class MaskPyramid:
    """One batch's mask, viewed at any stride that divides the patch size.

    ``at(factor)`` gives the mask upsampled by ``factor`` (feature map of size
    ``(h * factor, w * factor)``); results are cached so every layer at the same stride
    shares one tensor. ``keep`` is the number of visible patches per sample when it is the
    same for every sample (always true for masks from :func:`random_visible`), else ``None``.
    """

    def __init__(self, visible: Tensor, keep: int | None = None):
        if visible.dim() != 4 or visible.shape[1] != 1:
            raise ValueError(f"visible mask must have shape (B, 1, h, w), got {tuple(visible.shape)}")
        self.visible = visible.bool()
        self.batch, _, self.h, self.w = visible.shape
        self.keep = keep
        self._masks: dict[int, Tensor] = {1: self.visible}
        self._rows: dict[int, Tensor] = {}
        self._patch_ids: Tensor | None = None

    @classmethod
    def from_visible(cls, visible: Tensor) -> MaskPyramid:
        """Wrap a user-given mask, reading the per-sample count once (one host sync per batch)."""
        counts = visible.flatten(1).sum(1)
        if bool((counts == 0).any()):
            raise ValueError("every sample needs at least one visible patch")
        same = bool((counts == counts[0]).all())
        return cls(visible, int(counts[0]) if same else None)

    def factor(self, height: int, width: int) -> int | None:
        """The upsampling factor that maps the patch grid to ``height x width``, or None."""
        if height % self.h or width % self.w:
            return None
        f = height // self.h
        if f < 1 or f != width // self.w:
            return None
        return f

    def at(self, factor: int) -> Tensor:
        """Bool mask ``(B, 1, h * factor, w * factor)``."""
        m = self._masks.get(factor)
        if m is None:
            b, h, w = self.batch, self.h, self.w  # each patch's flag repeated over its sites, at once
            m = self.visible.view(b, 1, h, 1, w, 1).expand(b, 1, h, factor, w, factor).reshape(b, 1, h * factor, w * factor)
            self._masks[factor] = m
        return m

    def visible_patch_ids(self) -> Tensor:
        """``(B, keep)`` indices of each sample's visible patches on the ``h x w`` grid (row-major),
        ascending; needs the same count ``keep`` in every sample, and no host synchronisation."""
        if self.keep is None:
            raise ValueError("visible patch indices need the same number of visible patches in every sample")
        if self._patch_ids is None:
            flat = self.visible.reshape(self.batch, self.h * self.w).to(torch.uint8)
            ids = torch.argsort(flat, dim=1, descending=True, stable=True)[:, : self.keep]
            self._patch_ids = ids.sort(dim=1).values
        return self._patch_ids

    def rows(self, factor: int) -> Tensor:
        """Indices of the visible sites in a ``(B * H * W)`` row-major flattening, ascending.

        With a known per-sample count the number of rows is static, so this needs no host
        synchronisation.
        """
        idx = self._rows.get(factor)
        if idx is None:
            if self.keep is not None:  # the sites of the visible patches, in row-major order
                ids = self.visible_patch_ids()
                dev, f = ids.device, factor
                y = (ids // self.w).view(self.batch, -1, 1, 1) * f + torch.arange(f, device=dev).view(1, 1, f, 1)
                x = (ids % self.w).view(self.batch, -1, 1, 1) * f + torch.arange(f, device=dev).view(1, 1, 1, f)
                sample = torch.arange(self.batch, device=dev).view(-1, 1, 1, 1)
                idx = ((sample * (self.h * f) + y) * (self.w * f) + x).reshape(-1).sort().values
            else:
                idx = self.at(factor).reshape(-1).nonzero().squeeze(1)
            self._rows[factor] = idx
        return idx
