"""Reconstruction grids a person can read: column titles, tiles at least 128 px (nearest-neighbour
enlargement, so patches stay sharp), a label per row of a volume (its name and the slice axis)."""

import numpy as np
import torch

from sparkmim.modality import CLIP_SLICES, IMAGES, modality_for
from sparkmim.model import Reconstruction
from sparkmim.visualize import reconstruction_grid

COLOURS = [(0.2, 0.5, 0.8), (0.7, 0.3, 0.1)]
DOT = (0.9, 0.1, 0.9)


def flat(shape, colours):
    """Images (or volumes) of one colour each, with one dot of another at index (2, 5) of the
    last two dims."""
    x = torch.stack([torch.tensor(c).view(3, *([1] * (len(shape) - 2))).expand(3, *shape[2:]) for c in colours])
    x = x.clone()
    x[..., 2, 5] = torch.tensor(DOT).view(1, 3, *([1] * (len(shape) - 4)))
    return x


def rec_of(x):
    return Reconstruction(input=x, masked=x * 0.5, reconstruction=x * 0.25, prediction=x, visible=None)


def boxes(arr, colour):
    """Bounding boxes (top, left, bottom, right) of the connected columns of tiles of ``colour``."""
    hit = np.all(np.abs(arr.astype(int) - np.round(np.array(colour) * 255)) <= 1, axis=-1)
    rows, cols = np.nonzero(hit)
    return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


def dark(region):
    return (region.max(axis=-1) < 128).sum()


def test_image_grid_has_titles_and_tiles_enlarged_by_a_whole_factor():
    x = flat((2, 3, 32, 48), COLOURS)
    grid = reconstruction_grid(rec_of(x), mean=(0, 0, 0), std=(1, 1, 1))
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    tops = []
    for colour in COLOURS:  # the input column: a 32 x 48 image shown 3x larger (128 / 48, rounded up)
        top, left, bottom, right = boxes(arr, colour)
        assert (bottom - top, right - left) == (96, 144)
        dot = boxes(arr[top:bottom, left:right], DOT)
        assert dot == (6, 15, 9, 18)  # one pixel became a 3 x 3 block (nearest neighbour)
        tops.append(top)
    assert tops[1] - tops[0] == 96 + 4  # one row per image, a 4 px gap
    # the masked and reconstruction columns to the right, in the same row
    _, left0, _, right0 = boxes(arr, COLOURS[0])
    masked = boxes(arr, [c * 0.5 for c in COLOURS[0]])
    assert masked[0] == tops[0] and masked[1] == right0 + 4
    title = arr[: tops[0]]
    assert tops[0] >= 12
    for j in range(3):  # each column has a title above it
        assert dark(title[:, left0 + j * 148: left0 + j * 148 + 144]) > 20, j
    assert dark(arr[:, :left0]) == 0  # images have no label column


def test_volume_grid_labels_each_row_with_the_volume_and_the_slice_axis():
    x = flat((1, 3, 8, 16, 16), COLOURS[:1])
    grid = reconstruction_grid(rec_of(x), mean=(0, 0, 0), std=(1, 1, 1), names=["scan.nii.gz"])
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    hit = np.all(np.abs(arr.astype(int) - np.round(np.array(COLOURS[0]) * 255)) <= 1, axis=-1)
    top, left, bottom, right = boxes(arr, COLOURS[0])
    assert right - left == 128 and bottom - top == 3 * 128 + 2 * 4  # three slices of 16 px, 8x larger
    column = hit[:, left + 64]
    assert column[top:top + 128].all() and not column[top + 128:top + 132].any()  # three rows, gaps between
    for row in range(3):
        y = top + row * 132
        assert dark(arr[y:y + 128, :left]) > 30, row  # the label: volume name and slice axis
    wide = reconstruction_grid(rec_of(x), (0, 0, 0), (1, 1, 1), names=["a-much-longer-volume-name.nii.gz"])
    assert wide.shape[-1] > grid.shape[-1]  # the label column fits the name


def test_clips_name_their_slices_by_axis():
    assert modality_for("torchvision:r3d_18").slice_names == CLIP_SLICES
    assert modality_for("monai:resnet10").slice_names == ("axial", "coronal", "sagittal")
    assert modality_for("resnet50") is IMAGES and modality_for("torchvision:resnet18") is IMAGES


def test_non_finite_values_are_shown_in_magenta_and_warned_about():
    """A NaN patch in the reconstruction is drawn in magenta (not cast to an arbitrary colour) and
    counted in a warning."""
    import pytest

    rec = rec_of(flat((1, 3, 32, 32), COLOURS[:1]))
    rec.reconstruction[0, :, 4:8, 4:8] = float("nan")
    with pytest.warns(UserWarning, match=r"NaN or infinite values \(48 in the reconstruction column\), shown in magenta"):
        grid = reconstruction_grid(rec, mean=(0.0,) * 3, std=(1.0,) * 3)
    arr = np.round(grid.permute(1, 2, 0).numpy() * 255).astype(int)
    magenta = np.all(arr == (255, 0, 255), axis=-1)
    assert magenta.sum() == 16 * 4 * 4  # the 4 x 4 patch, each pixel enlarged 4x (32 px -> 128 px tiles)


def test_metrics_of_a_short_run_are_drawn_on_whole_steps():
    """metrics.png of a run that logged one step: whole steps on the axis, the point inside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from sparkmim.train.metrics import metrics_figure

    fig = metrics_figure([{"step": 3, "epoch": 1, "loss": 0.99, "grad_norm": 1.2, "lr": 1e-3, "images_seen": 24}])
    FigureCanvasAgg(fig).draw()
    plots = [ax for ax in fig.axes if ax.get_xlabel() == "step"]
    assert len(plots) == 3
    for ax in plots:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert low < 3 < high and ax.lines[0].get_marker() == "o"
