"""Reconstruction grids: one row per image (per central slice of a volume), columns input |
masked | reconstruction."""

from __future__ import annotations

from pathlib import Path

import torch

from .model import Reconstruction

__all__ = ["reconstruction_grid", "orthogonal_slices", "save_grid", "save_reconstruction_grid"]


def reconstruction_grid(rec: Reconstruction, mean, std, max_images: int = 8) -> torch.Tensor:
    """A ``(3, H', W')`` image in [0, 1] (grayscale inputs are shown as gray, more than 3
    channels by their first 3). The reconstruction column de-normalises the prediction of each
    masked patch with the true patch's mean and variance (the model predicts per-patch normalised
    pixels), as is usual for such grids."""
    from torchvision.utils import make_grid

    if rec.input.dim() == 5:
        rec, max_images = orthogonal_slices(rec), 3 * max_images
    n = min(max_images, rec.input.shape[0])
    c = rec.input.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def show(x):
        x = x[:n].float().cpu()
        if m.shape[1] == x.shape[1]:
            x = x * s + m
        x = x.clamp(0, 1)
        return x.expand(-1, 3, -1, -1) if c == 1 else x[:, :3]

    # masked patches are zero in normalised space, so they show in the data's mean colour
    rows = torch.stack([show(rec.input), show(rec.masked), show(rec.reconstruction)], dim=1).flatten(0, 1)
    return make_grid(rows, nrow=3, padding=2, pad_value=1.0)


def orthogonal_slices(rec: Reconstruction) -> Reconstruction:
    """A 3-D reconstruction as 2-D images: for each volume its three central slices (across
    depth, height and width), each resized (nearest) to a square of the volume's largest side."""
    import torch.nn.functional as F

    def slices(v: torch.Tensor) -> torch.Tensor:
        d, h, w = v.shape[2:]
        side = max(d, h, w)
        views = [v[:, :, d // 2], v[:, :, :, h // 2], v[:, :, :, :, w // 2]]
        views = [F.interpolate(x.float(), size=(side, side), mode="nearest") for x in views]
        return torch.stack(views, dim=1).flatten(0, 1)  # volume by volume, three views each

    return Reconstruction(input=slices(rec.input), masked=slices(rec.masked), reconstruction=slices(rec.reconstruction),
                          prediction=slices(rec.prediction), visible=rec.visible)


def save_grid(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a ``(3, H, W)`` image in [0, 1] as PNG, creating the folder."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path


def save_reconstruction_grid(rec: Reconstruction, path: str | Path, mean, std, max_images: int = 8) -> Path:
    return save_grid(reconstruction_grid(rec, mean, std, max_images), path)
