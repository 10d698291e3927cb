"""Reconstruction grids: one row per image (per central slice of a volume), columns input |
masked | reconstruction, with their titles; a volume's rows are labelled with its name and the
slice's axis."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .modality import MODALITIES, Modality
from .model import Reconstruction

__all__ = ["reconstruction_grid", "grid_rows", "compose_rows", "orthogonal_slices", "save_grid", "save_reconstruction_grid", "COLUMNS",
           "MIN_TILE"]

COLUMNS = ("input", "masked", "reconstruction")
MIN_TILE = 128  # tiles are shown at least this large (nearest-neighbour upscaling)
_GAP, _WHITE = 4, (255, 255, 255)
_NONFINITE = torch.tensor([1.0, 0.0, 1.0])  # magenta: a pixel that is NaN or infinite


def reconstruction_grid(rec: Reconstruction, mean, std, max_images: int = 8, names: list[str] | None = None,
                        modality: Modality | None = None, min_tile: int = MIN_TILE) -> Tensor:
    """A ``(3, H', W')`` image in [0, 1]: a title row (input | masked | reconstruction), then the
    rows ``modality`` shows (its :meth:`~sparkmim.modality.Modality.rows`): one per image, or three
    per volume (its central slices, each labelled with the volume's name from ``names`` and the
    slice's axis). ``modality`` None: by the number of spatial dims of ``rec``
    (:data:`~sparkmim.modality.MODALITIES`). Tiles smaller than ``min_tile`` pixels are enlarged
    by a whole factor (nearest neighbour), so patches stay sharp.

    Grayscale inputs are shown as gray, two channels by the first in gray, more than 3 channels by
    their first 3. The reconstruction
    column de-normalises the prediction of each masked patch with the true patch's mean and
    variance (the model predicts per-patch normalised pixels), as is usual for such grids. NaN or
    infinite values are shown in magenta, with a warning that counts them."""
    return compose_rows(*grid_rows(rec, mean, std, max_images, names, modality, min_tile))


def grid_rows(rec: Reconstruction, mean, std, max_images: int = 8, names: list[str] | None = None,
              modality: Modality | None = None, min_tile: int = MIN_TILE) -> tuple[list[list], list[str] | None]:
    """The rows of :func:`reconstruction_grid` (three tiles each) and their labels, for
    :func:`compose_rows`; rows of reconstructions of different sizes can be composed together."""
    modality = modality or MODALITIES[rec.input.dim() - 2]
    count = min(max_images, rec.input.shape[0])
    rec, labels = modality.rows(_first(rec, count), names, count)
    n = rec.input.shape[0]
    c = rec.input.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def show(x: Tensor) -> Tensor:
        x = x[:n].float().cpu()
        if m.shape[1] == x.shape[1]:
            x = x * s + m
        x = x[:, :1].expand(-1, 3, -1, -1) if c < 3 else x[:, :3]
        bad = ~torch.isfinite(x).all(dim=1, keepdim=True)
        return torch.where(bad, _NONFINITE.view(1, 3, 1, 1), x.clamp(0, 1))

    # masked patches are zero in normalised space, so they show in the data's mean colour
    raw = (rec.input, rec.masked, rec.reconstruction)
    columns = [show(x) for x in raw]
    nonfinite = [int((~torch.isfinite(x[:n].float())).sum()) for x in raw]
    if any(nonfinite):
        import warnings

        counts = ", ".join(f"{k} in the {name} column" for k, name in zip(nonfinite, COLUMNS) if k)
        warnings.warn(f"the reconstruction grid holds NaN or infinite values ({counts}), shown in magenta: the model "
                      f"or its inputs hold non-finite numbers", stacklevel=3)
    h, w = columns[0].shape[-2:]
    scale = max(1, -(-min_tile // max(h, w)))  # ceil(min_tile / side)
    return [[_to_pil(col[i], scale) for col in columns] for i in range(n)], labels


def _to_pil(image: Tensor, scale: int):
    from PIL import Image

    arr = (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    if scale > 1:
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(arr, "RGB")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def compose_rows(tiles: list[list], labels: list[str] | None) -> Tensor:
    """Rows of tiles on white, a title above each column, a label left of each row; a row's tiles
    share a size, and each column is as wide as its widest tile."""
    from PIL import Image, ImageDraw

    tw = max(row[0].size[0] for row in tiles)
    font = _font(max(12, min(20, tw // 10)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    title_h = max(text_size(t)[1] for t in COLUMNS) + 2 * _GAP
    label_w = max(text_size(t)[0] for t in labels) + 2 * _GAP if labels else 0
    width = label_w + len(COLUMNS) * (tw + _GAP) + _GAP
    height = title_h + sum(row[0].size[1] + _GAP for row in tiles) + _GAP
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(COLUMNS):
        x = label_w + _GAP + j * (tw + _GAP) + (tw - text_size(title)[0]) // 2
        draw.text((x, _GAP), title, fill=(0, 0, 0), font=font)
    y = title_h
    for i, row in enumerate(tiles):
        th = row[0].size[1]
        if labels:
            draw.multiline_text((_GAP, y + (th - text_size(labels[i])[1]) // 2), labels[i], fill=(0, 0, 0), font=font)
        for j, tile in enumerate(row):
            canvas.paste(tile, (label_w + _GAP + j * (tw + _GAP), y))
        y += th + _GAP
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0


def orthogonal_slices(rec: Reconstruction) -> Reconstruction:
    """A 3-D reconstruction as 2-D images: for each volume its three central slices (across
    depth, height and width), each resized (nearest) to a square of the volume's largest side."""
    import torch.nn.functional as F

    def slices(v: Tensor) -> Tensor:
        d, h, w = v.shape[2:]
        side = max(d, h, w)
        views = [v[:, :, d // 2], v[:, :, :, h // 2], v[:, :, :, :, w // 2]]
        views = [F.interpolate(x.float(), size=(side, side), mode="nearest") for x in views]
        return torch.stack(views, dim=1).flatten(0, 1)  # volume by volume, three views each

    return Reconstruction(input=slices(rec.input), masked=slices(rec.masked), reconstruction=slices(rec.reconstruction),
                          prediction=slices(rec.prediction), visible=rec.visible)


def _first(rec: Reconstruction, n: int) -> Reconstruction:
    """The images of the first ``n`` samples of a reconstruction (the mask is not shown)."""
    return dataclasses.replace(rec, input=rec.input[:n], masked=rec.masked[:n], reconstruction=rec.reconstruction[:n],
                               prediction=rec.prediction[:n])


def save_grid(grid: Tensor, path: str | Path) -> Path:
    """Write a ``(3, H, W)`` image in [0, 1] as PNG (atomically, creating the folder)."""
    from torchvision.utils import save_image

    from .weights import atomic_write

    return atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


def save_reconstruction_grid(rec: Reconstruction, path: str | Path, mean, std, max_images: int = 8,
                             **labels) -> Path:
    """:func:`reconstruction_grid` written to ``path`` (``labels``: its ``names`` and ``modality``)."""
    return save_grid(reconstruction_grid(rec, mean, std, max_images, **labels), path)
