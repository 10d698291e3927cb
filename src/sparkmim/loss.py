"""Patchify / unpatchify and the masked, per-patch normalised pixel loss (paper section 3.3)."""

from __future__ import annotations

import math

from torch import Tensor

from .masking import per_axis

__all__ = ["patchify", "unpatchify", "normalize_patches", "masked_patch_loss"]


def patchify(x: Tensor, patch_size) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, L, P * P * C)`` with ``L = (H / P) * (W / P)`` in row-major patch
    order; likewise ``(B, C, D, H, W)`` with a patch size per axis (or one for all)."""
    b, c, *sizes = x.shape
    n = len(sizes)
    p = per_axis(patch_size, n)
    grid = [s // q for s, q in zip(sizes, p)]
    x = x.reshape(b, c, *[v for pair in zip(grid, p) for v in pair])  # (B, C, g0, p0, g1, p1, ...)
    order = [0, *range(2, 2 + 2 * n, 2), *range(3, 3 + 2 * n, 2), 1]  # (B, g..., p..., C)
    return x.permute(order).reshape(b, math.prod(grid), math.prod(p) * c)


def unpatchify(x: Tensor, patch_size, grid: tuple[int, ...], channels: int) -> Tensor:
    """Inverse of :func:`patchify`."""
    b, n = x.shape[0], len(grid)
    p = per_axis(patch_size, n)
    x = x.reshape(b, *grid, *p, channels)
    order = [0, 2 * n + 1, *[v for a in range(n) for v in (1 + a, 1 + n + a)]]  # (B, C, g0, p0, g1, p1, ...)
    return x.permute(order).reshape(b, channels, *(g * q for g, q in zip(grid, p)))


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise each patch by its own mean and ``sqrt(var + eps)`` (unbiased variance over the
    patch's pixels and channels). Returns ``(normalised, mean, std)``."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def masked_patch_loss(
    prediction: Tensor,
    images: Tensor,
    visible: Tensor,
    patch_size: int,
    *,
    eps: float = 1e-6,
    masked_only: bool = True,
    norm_pix: bool = True,
) -> Tensor:
    """L2 between ``prediction`` and per-patch normalised ``images`` (``norm_pix`` False: the
    images themselves), averaged per patch and then over the masked patches (or over all patches
    when ``masked_only`` is False).

    Args:
        prediction: ``(B, C, H, W)`` in normalised-patch space.
        images: ``(B, C, H, W)`` the (augmented, normalised) input images (or ``(B, C, D, H, W)``).
        visible: ``(B, 1, H / P, W / P)`` bool, True = visible (``(B, 1, D / Pd, H / Ph, W / Pw)``).
    """
    target = patchify(images, patch_size)
    if norm_pix:
        target, _, _ = normalize_patches(target, eps)
    per_patch = (patchify(prediction, patch_size) - target).pow(2).mean(dim=-1)  # (B, L)
    if not masked_only:
        return per_patch.mean()
    weight = (~visible).flatten(1).to(per_patch.dtype)  # (B, L): 1 on masked patches
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
