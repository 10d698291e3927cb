"""Patch-wise random masks and their views at every feature stride.

A mask is a boolean tensor ``visible`` of shape ``(B, 1, h, w)`` on the patch grid, where
``h = H / P`` and ``w = W / P`` for images of ``H x W`` pixels and patch size ``P`` (the
encoder's total stride). ``True`` marks a kept (visible) patch.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

__all__ = ["per_axis", "grid_size", "grid_of", "check_mask_ratio", "num_visible", "random_visible", "MaskPyramid", "seed_for"]


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


def per_axis(value, n: int) -> tuple:
    """``n`` values (one per spatial axis) from one value or a sequence of one or ``n``."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return (value[0],) * n
        if len(value) == n:
            return tuple(value)
        raise ValueError(f"expected one or {n} values, got {value!r}")
    return (value,) * n


def grid_of(sizes: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, ...]:
    """The patch grid of an input of spatial ``sizes`` (2-D or 3-D) with ``patch`` sites per
    patch along each axis, or a clear error."""
    if len(sizes) == 2 and len(set(patch)) == 1:
        return grid_size(sizes[0], sizes[1], patch[0])
    if any(p < 1 for p in patch):
        raise ValueError(f"patch size must be positive integers, got {patch}")
    shown, patch_shown = "x".join(map(str, sizes)), "x".join(map(str, patch))
    if any(s % p for s, p in zip(sizes, patch)):
        fit = "x".join(str(max(1, round(s / p)) * p) for s, p in zip(sizes, patch))
        raise ValueError(f"input size {shown} is not a multiple of the patch size {patch_shown} (the encoder's "
                         f"total stride along each axis); resize or crop to e.g. {fit}")
    grid = tuple(s // p for s, p in zip(sizes, patch))
    if math.prod(grid) < 2:
        raise ValueError(f"input size {shown} holds a single {patch_shown} patch; masked modeling needs at least "
                         f"2 patches")
    return grid


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
    grid: tuple[int, ...],
    mask_ratio: float = 0.6,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw per-sample random masks with exactly ``num_visible`` kept patches each.

    Returns a bool tensor ``(batch, 1, *grid)`` (``grid``: ``(h, w)`` or ``(d, h, w)``). The draw happens on ``device`` (or the
    generator's device), so no host synchronisation is needed on accelerators.
    """
    n = math.prod(grid)
    keep = num_visible(n, mask_ratio)
    if generator is not None:
        device = generator.device
    noise = torch.rand(batch, n, generator=generator, device=device)
    kept = noise.argsort(dim=1)[:, :keep]
    visible = torch.zeros(batch, n, dtype=torch.bool, device=noise.device)
    visible.scatter_(1, kept, True)
    return visible.view(batch, 1, *grid)


class MaskPyramid:
    """One batch's mask, viewed at any stride that divides the patch size.

    ``visible`` is ``(B, 1, h, w)`` for images or ``(B, 1, d, h, w)`` for volumes and clips
    (``spatial_dims`` 2 or 3; ``grid`` is its spatial shape). ``at(factor)`` gives the mask
    upsampled by ``factor`` sites per patch along each axis (an int: the same along every axis;
    or one int per axis); results are cached so every layer at the same stride shares one
    tensor. :meth:`factor` names the factor of a map's spatial size: an int for 2-D maps (their
    factors are equal along both axes), a tuple per axis for 3-D ones (patches may be anisotropic,
    e.g. ``(8, 32, 32)`` voxels for a clip). ``keep`` is the number of visible patches per sample
    when it is the same for every sample (always true for masks from :func:`random_visible`),
    else ``None``.
    """

    def __init__(self, visible: Tensor, keep: int | None = None):
        if visible.dim() not in (4, 5) or visible.shape[1] != 1:
            raise ValueError(f"visible mask must have shape (B, 1, h, w) or (B, 1, d, h, w), got {tuple(visible.shape)}")
        self.visible = visible.bool()
        self.batch = visible.shape[0]
        self.grid = tuple(visible.shape[2:])
        self.spatial_dims = len(self.grid)
        self.h, self.w = self.grid[-2:]
        self.keep = keep
        self._masks: dict[tuple[int, ...], Tensor] = {(1,) * self.spatial_dims: self.visible}
        self._rows: dict[tuple[int, ...], Tensor] = {}
        self._patch_ids: Tensor | None = None

    @classmethod
    def from_visible(cls, visible: Tensor) -> MaskPyramid:
        """Wrap a user-given mask, reading the per-sample count once (one host sync per batch)."""
        counts = visible.flatten(1).sum(1)
        if bool((counts == 0).any()):
            raise ValueError("every sample needs at least one visible patch")
        same = bool((counts == counts[0]).all())
        return cls(visible, int(counts[0]) if same else None)

    def factor(self, *sizes: int):
        """The upsampling factor that maps the patch grid to a map of spatial size ``sizes``: an
        int for 2-D masks (None unless both axes agree), a tuple per axis for 3-D ones; None when
        ``sizes`` is not a whole multiple of the grid."""
        if len(sizes) != self.spatial_dims:
            return None
        factors = []
        for size, g in zip(sizes, self.grid):
            if size < g or size % g:
                return None
            factors.append(size // g)
        if self.spatial_dims == 2:
            return factors[0] if factors[0] == factors[1] else None
        return tuple(factors)

    def at(self, factor) -> Tensor:
        """Bool mask ``(B, 1, *[g * f for each axis])``."""
        fs = per_axis(factor, self.spatial_dims)
        m = self._masks.get(fs)
        if m is None:  # each patch's flag repeated over its sites, at once
            b, g = self.batch, self.grid
            split = [n for pair in zip(g, fs) for n in pair]  # (g0, f0, g1, f1, ...)
            ones = [n for pair in zip(g, (1,) * len(g)) for n in pair]
            m = self.visible.view(b, 1, *ones).expand(b, 1, *split).reshape(b, 1, *(a * f for a, f in zip(g, fs)))
            self._masks[fs] = m
        return m

    def visible_patch_ids(self) -> Tensor:
        """``(B, keep)`` indices of each sample's visible patches on the grid (row-major),
        ascending; needs the same count ``keep`` in every sample, and no host synchronisation."""
        if self.keep is None:
            raise ValueError("visible patch indices need the same number of visible patches in every sample")
        if self._patch_ids is None:
            flat = self.visible.reshape(self.batch, -1).to(torch.uint8)
            ids = torch.argsort(flat, dim=1, descending=True, stable=True)[:, : self.keep]
            self._patch_ids = ids.sort(dim=1).values
        return self._patch_ids

    def rows(self, factor) -> Tensor:
        """Indices of the visible sites in a ``(B * prod(sizes))`` row-major flattening, ascending.

        With a known per-sample count the number of rows is static, so this needs no host
        synchronisation.
        """
        fs = per_axis(factor, self.spatial_dims)
        idx = self._rows.get(fs)
        if idx is None:
            if self.keep is not None:  # the sites of the visible patches, in row-major order
                ids = self.visible_patch_ids()
                dev, n = ids.device, self.spatial_dims
                flat = torch.arange(self.batch, device=dev).view(-1, 1, *([1] * n))
                rest = ids
                coords = []
                for g in reversed(self.grid):  # the patch's position along each axis
                    coords.append(rest % g)
                    rest = rest // g
                for axis, (c, g, f) in enumerate(zip(reversed(coords), self.grid, fs)):
                    sites = torch.arange(f, device=dev).view(1, 1, *[f if a == axis else 1 for a in range(n)])
                    flat = flat * (g * f) + c.view(self.batch, -1, *([1] * n)) * f + sites
                idx = flat.reshape(-1).sort().values
            else:
                idx = self.at(fs).reshape(-1).nonzero().squeeze(1)
            self._rows[fs] = idx
        return idx
