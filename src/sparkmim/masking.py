"""Patch-wise random masks and their views at every feature stride.

A mask is a boolean tensor ``visible`` of shape ``(B, 1, *grid)`` on the patch grid: ``(h, w) =
(H / Ph, W / Pw)`` for images of ``H x W`` pixels, ``(d, h, w)`` for volumes and clips, with a
patch size ``P`` per axis (the encoder's total stride). ``True`` marks a kept (visible) patch.
Every scale here (patch sizes, factors, grids) is a tuple with one entry per spatial axis.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

__all__ = ["per_axis", "shown_size", "grid_size", "grid_of", "check_mask_ratio", "num_visible", "random_visible", "MaskPyramid", "seed_for"]


def seed_for(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (a run's seed, an epoch, a step, ...), for
    random numbers that must come out the same after a resume, in any process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def grid_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The patch grid ``(h, w)`` of an ``height x width`` image with square patches (the 2-D
    spelling of :func:`grid_of`), or a clear error."""
    return grid_of((height, width), (patch_size, patch_size))


def per_axis(value, n: int) -> tuple:
    """``n`` values (one per spatial axis) from one value or a sequence of one or ``n``."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return (value[0],) * n
        if len(value) == n:
            return tuple(value)
        raise ValueError(f"expected one or {n} values, got {value!r}")
    return (value,) * n


def shown_size(sizes: tuple[int, ...]) -> str:
    """``32`` for a size that is the same along every axis, else ``8x16x16``."""
    return str(sizes[0]) if len(set(sizes)) == 1 else "x".join(map(str, sizes))


def grid_of(sizes: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, ...]:
    """The patch grid of an input of spatial ``sizes`` (one per axis) with ``patch`` sites per
    patch along each axis, or a clear error."""
    if any(p < 1 for p in patch):
        raise ValueError(f"patch size must be positive integers, got {patch}")
    shown = "x".join(map(str, sizes))
    if any(s % p for s, p in zip(sizes, patch)):
        fit = "x".join(str(max(1, round(s / p)) * p) for s, p in zip(sizes, patch))
        raise ValueError(f"input size {shown} is not a multiple of the patch size {shown_size(patch)} (the encoder's "
                         f"total stride along each axis); resize or crop to e.g. {fit}")
    grid = tuple(s // p for s, p in zip(sizes, patch))
    if math.prod(grid) < 2:
        least = "x".join(map(str, (*patch[:-1], 2 * patch[-1])))
        raise ValueError(f"input size {shown} holds a single {shown_size(patch)} patch; masked modeling needs at least "
                         f"2 patches (use an input of at least {least})")
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
    upsampled by ``factor`` sites per patch along each axis (one int per axis; a single int is
    read as the same along every axis); results are cached so every layer at the same stride
    shares one tensor. :meth:`factor` names the factor, one per axis, of a map's spatial size
    (patches may be anisotropic, e.g. ``(8, 32, 32)`` voxels for a clip). ``keep`` is the number of visible patches per sample
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

    def factor(self, *sizes: int) -> tuple[int, ...] | None:
        """The upsampling factor, one per axis, that maps the patch grid to a map of spatial size
        ``sizes``; None when ``sizes`` is not a whole multiple of the grid."""
        if len(sizes) != self.spatial_dims or any(size < g or size % g for size, g in zip(sizes, self.grid)):
            return None
        return tuple(size // g for size, g in zip(sizes, self.grid))

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
