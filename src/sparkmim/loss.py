"""Patchify / unpatchify and the masked, per-patch normalised pixel loss (paper section 3.3)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["patchify", "unpatchify", "normalize_patches", "masked_patch_loss"]


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, L, P * P * C)`` with ``L = (H / P) * (W / P)`` in row-major patch order."""
    b, c, h, w = x.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = x.reshape(b, c, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)


def unpatchify(x: Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`."""
    b = x.shape[0]
    p = patch_size
    gh, gw = grid
    x = x.reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)


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
) -> Tensor:
    """L2 between ``prediction`` and per-patch normalised ``images``, averaged per patch and
    then over the masked patches (or over all patches when ``masked_only`` is False).

    Args:
        prediction: ``(B, C, H, W)`` in normalised-patch space.
        images: ``(B, C, H, W)`` the (augmented, normalised) input images.
        visible: ``(B, 1, H / P, W / P)`` bool, True = visible.
    """
    target, _, _ = normalize_patches(patchify(images, patch_size), eps)
    per_patch = (patchify(prediction, patch_size) - target).pow(2).mean(dim=-1)  # (B, L)
    if not masked_only:
        return per_patch.mean()
    weight = (~visible).flatten(1).to(per_patch.dtype)  # (B, L): 1 on masked patches
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
