"""Volume data (CT, MRI, microscopy stacks, clips): files, intensities, 3-D augmentation.

Readers: NIfTI (``.nii``, ``.nii.gz``, with nibabel), NumPy ``.npy`` and multi-page TIFF
stacks (``.tif``, ``.tiff``, with tifffile). A volume is a float32 array ``(C, D, H, W)``:
NIfTI voxel axes ``(i, j, k)`` become ``(W, H, D)`` (slices along ``k`` are the depth), an
``.npy`` array is ``(D, H, W)`` or ``(C, D, H, W)``, a TIFF stack is ``(pages, height,
width)``. A 4-D NIfTI series ``(i, j, k, t)`` holds ``t`` volumes: each is a sample of its own
(:func:`list_samples`), unless ``t`` equals the channel count, where its volumes are the
channels. Files that cannot be used (unreadable, wrong number of dims, NaN or infinite voxels,
a channel count other than the run's) are reported with the reason and skipped, as unreadable
images are (:class:`~sparkmim.data.ImageFiles`).

Augmentation (:func:`volume_transform`): MONAI's random scaled crop (each axis 67-100 % of the
volume by default), trilinear resize to the training size, a left-right flip, and one of two
intensity normalisations: per-volume z-score (MRI, microscopy; the default) or a CT window
(clip to ``[low, high]`` Hounsfield units, scaled to ``[-1, 1]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .config import parse_intensity
from .data import DataError, ImageFiles, list_files

__all__ = ["VOLUME_EXTENSIONS", "is_volume_file", "list_volumes", "read_volume", "list_samples", "volume_transform",
           "volume_eval_transform", "VolumeFiles", "demo_volume_paths", "volume_shape", "voxel_spacing", "foreground_crop", "resample",
           "read_sample", "read_nnunet_dataset", "is_nnunet_dataset"]

VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".npy", ".tif", ".tiff")

# small real MRI volumes shipped inside nibabel's test data (nothing is downloaded)
_DEMO_NAMES = ["anatomical.nii", "example4d.nii.gz", "functional.nii", "reoriented_anat_moved.nii"]


def _needs(module: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise RuntimeError(f"{what} needs {module.split('.')[0]}: pip install 'sparkmim[3d]'") from e


def is_volume_file(path: Path) -> bool:
    return is_volume_name(path.name)


def is_volume_name(name: str) -> bool:
    return name.lower().endswith(VOLUME_EXTENSIONS)


def list_volumes(source: str | Path) -> Sequence[Path]:
    """All volume files under a folder (recursively, sorted; label maps left out: ``labelsTr/``,
    ``gt_segmentations/``, ``*_seg.*``), or the paths a text file lists (one per line, relative to
    its folder; ``#`` comments)."""
    return list_files(source, is_volume_name, "volumes", VOLUME_EXTENSIONS)


def _raw(path: Path) -> np.ndarray:
    """The file's array as stored (NIfTI in voxel order, scaled by its slope and intercept)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        nib = _needs("nibabel", "reading NIfTI files")
        return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    if name.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    if name.endswith((".tif", ".tiff")):
        tifffile = _needs("tifffile", "reading TIFF stacks")
        return tifffile.imread(str(path))
    raise ValueError(f"not a volume file ({', '.join(VOLUME_EXTENSIONS)}): {path.name}")


def _series_length(path: Path) -> int:
    """How many volumes a file holds: the 4th dim of a 4-D NIfTI series (read from the header),
    else 1."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        nib = _needs("nibabel", "reading NIfTI files")
        shape = nib.load(str(path)).shape
        return int(shape[3]) if len(shape) == 4 else 1
    return 1


def read_volume(path: str | Path, channels: int = 1, index: int | None = None) -> np.ndarray:
    """A float32 ``(C, D, H, W)`` volume (see the module notes for the axes); ``index`` picks one
    volume of a 4-D NIfTI series. Raises ``ValueError`` for a file that cannot be used."""
    path = Path(path)
    arr = _raw(path)
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    if nifti and arr.ndim == 4:
        if index is not None:
            arr = arr[..., index]
        elif arr.shape[3] == channels:
            arr = np.moveaxis(arr, 3, 0)  # the series' volumes are the channels
        else:
            raise ValueError(f"a 4-D series of {arr.shape[3]} volumes, read as {channels} channel(s)")
    if nifti:  # (i, j, k) -> (k, j, i): depth, height, width; channels first
        arr = arr.T if arr.ndim == 3 else np.ascontiguousarray(arr.transpose(0, 3, 2, 1))
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"{arr.ndim}-D array of shape {tuple(arr.shape)}: a volume is (D, H, W) or (C, D, H, W)")
    if arr.shape[0] != channels:
        raise ValueError(f"{arr.shape[0]} channel(s) of shape {tuple(arr.shape[1:])}, the run reads {channels}")
    if min(arr.shape[1:]) < 1:
        raise ValueError(f"empty volume of shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"voxels of type {arr.dtype}, not real numbers")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{int((~np.isfinite(arr)).sum())} NaN or infinite voxels")
    return arr


def volume_shape(path: str | Path, spacing: tuple[float, float, float] | None = None) -> tuple[int, int, int]:
    """The ``(D, H, W)`` size of a volume file, read from its header (NIfTI), array header
    (``.npy``) or page list (TIFF), without reading its voxels; with ``spacing``, the size it has
    once resampled to it (NIfTI)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        nib = _needs("nibabel", "reading NIfTI files")
        header = nib.load(str(path)).header
        i, j, k = header.get_data_shape()[:3]
        shape = (k, j, i)
        if spacing is not None:
            zooms = header.get_zooms()[:3]
            shape = tuple(max(1, round(n * z / t)) for n, z, t in zip(shape, zooms[::-1], spacing))
        return shape
    if name.endswith(".npy"):
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape[-3:])
    if name.endswith((".tif", ".tiff")):
        tifffile = _needs("tifffile", "reading TIFF stacks")
        with tifffile.TiffFile(str(path)) as tif:
            return tuple(tif.series[0].shape[-3:])
    raise ValueError(f"not a volume file ({', '.join(VOLUME_EXTENSIONS)}): {path.name}")


def voxel_spacing(path: str | Path) -> tuple[float, float, float]:
    """The voxel size of a NIfTI file along ``(D, H, W)`` (its header's ``k``, ``j``, ``i`` zooms,
    in the file's units, usually mm). ``ValueError`` for files without one (``.npy``, TIFF)."""
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"--spacing needs voxel sizes, which only NIfTI files carry, not {path.suffix} files")
    nib = _needs("nibabel", "reading NIfTI files")
    zooms = nib.load(str(path)).header.get_zooms()[:3]
    if len(zooms) < 3 or min(zooms) <= 0:
        raise ValueError(f"its header gives no positive voxel size along each axis ({tuple(map(float, zooms))})")
    return float(zooms[2]), float(zooms[1]), float(zooms[0])


def foreground_crop(volume: np.ndarray) -> np.ndarray:
    """``volume`` (``(C, D, H, W)``) cropped to the bounding box of its voxels that are non-zero in
    any channel, as nnU-Net crops before preprocessing; a volume without any is kept whole."""
    nonzero = (volume != 0).any(axis=0)
    if not nonzero.any():
        return volume
    box = []
    for axis in range(3):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return volume[(slice(None), *box)]


def resample(volume: np.ndarray, spacing: tuple[float, float, float], target: tuple[float, float, float]) -> np.ndarray:
    """``volume`` with voxels of ``spacing`` resampled (trilinear, MONAI's ``Spacing``) to voxels of
    ``target``, both along ``(D, H, W)``: the same physical extent on the new grid."""
    if tuple(spacing) == tuple(target):
        return volume
    transforms = _needs("monai.transforms", "--spacing")
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    out = transforms.Spacing(pixdim=tuple(target), mode="bilinear")(MetaTensor(torch.from_numpy(volume), affine=affine))
    return np.ascontiguousarray(out.as_tensor().numpy(), dtype=np.float32)


def read_sample(files: tuple[Path, ...], channels: int = 1, index: int | None = None,
                spacing: tuple[float, float, float] | None = None, foreground: bool = False) -> np.ndarray:
    """One training volume ``(C, D, H, W)``: the file (``index``: one volume of a 4-D series), or
    one file per channel (an nnU-Net case, ``CASE_0000``, ``CASE_0001``, ...) of equal shapes;
    cropped to its foreground (``foreground``), then resampled to ``spacing`` (along ``(D, H,
    W)``; None keeps the voxel grid). ``ValueError`` for a sample that cannot be used."""
    if len(files) == 1:
        volume = read_volume(files[0], channels, index)
    else:
        parts = [read_volume(f, 1) for f in files]
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"its channel files differ in shape ({', '.join('x'.join(map(str, s)) for s in shapes)})")
        volume = np.concatenate(parts)
    if foreground:
        volume = foreground_crop(volume)
    if spacing is not None:
        volume = resample(volume, voxel_spacing(files[0]), spacing)
    return volume


def read_nnunet_dataset(folder: str | Path) -> tuple[list[tuple[Path, ...]], list[str]]:
    """The cases of an nnU-Net raw dataset folder (``dataset.json``, ``imagesTr/CASE_0000.nii.gz``,
    ``CASE_0001.nii.gz``, ...): for each case its channel files in channel order, and the channel
    names of ``dataset.json`` (``channel_names``, or ``modality`` in older datasets). Only
    ``imagesTr`` is read (``imagesTs`` may hold the cases a model is finally tested on). A case
    missing a channel file is refused, naming it."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "dataset.json").read_text())
        names = meta.get("channel_names", meta.get("modality"))
        channels = [names[k] for k in sorted(names, key=int)]
    except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        raise DataError(f"{folder / 'dataset.json'} is not an nnU-Net dataset description with channel_names: "
                        f"{e}") from e
    ending = meta.get("file_ending", ".nii.gz")
    images = folder / "imagesTr"
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    found: dict[str, dict[int, Path]] = {}
    for p in sorted(images.glob(f"*{ending}")) if images.is_dir() else []:
        m = pattern.match(p.name)
        if m:
            found.setdefault(m.group(1), {})[int(m.group(2))] = p
    if not found:
        raise DataError(f"no cases (CASE_0000{ending}) in {images}")
    cases = []
    for case, files in found.items():
        lacking = [f"{case}_{c:04d}{ending}" for c in range(len(channels)) if c not in files]
        if lacking:
            raise DataError(f"nnU-Net dataset {folder}: case {case} lacks {', '.join(lacking)} (dataset.json names "
                            f"{len(channels)} channels: {', '.join(channels)})")
        cases.append(tuple(files[c] for c in range(len(channels))))
    return cases, channels


def is_nnunet_dataset(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "dataset.json").is_file() and (path / "imagesTr").is_dir()


def list_samples(paths: list[Path]) -> list[tuple[Path, int | None]]:
    """``(path, index)`` per training sample: one per volume of a 4-D NIfTI series, one per other
    file (``index`` None). A file whose header cannot be read is kept as one sample, so that it
    is reported as unreadable when it is read."""
    samples: list[tuple[Path, int | None]] = []
    for p in paths:
        try:
            n = _series_length(p)
        except Exception:
            n = 1
        samples.extend((p, t) for t in range(n)) if n > 1 else samples.append((p, None))
    return samples


def _intensity(transforms, intensity: str):
    """The MONAI transform of an ``--intensity`` option."""
    kind, window = parse_intensity(intensity)
    if kind == "window":
        return transforms.ScaleIntensityRange(window[0], window[1], b_min=-1.0, b_max=1.0, clip=True)
    return transforms.NormalizeIntensity(channel_wise=True)


def volume_transform(size: tuple[int, int, int], intensity: str | None = "zscore", scale=(0.67, 1.0),
                     flip: float = 0.5):
    """Random scaled crop (each axis ``scale`` of the volume), trilinear resize to ``size`` ``(D,
    H, W)``, left-right flip with probability ``flip``, then the intensity normalisation (None:
    none, for data normalised already); MONAI transforms, their random state set per sample by
    :class:`VolumeFiles`. The crop comes first: stored volumes are read by its region alone
    (:class:`~sparkmim.arrays.ArrayVolumes`)."""
    transforms = _needs("monai.transforms", "3-D augmentation")
    return transforms.Compose([
        transforms.RandScaleCrop(roi_scale=scale[0], max_roi_scale=scale[1], random_size=True),
        transforms.Resize(tuple(size), mode="trilinear"),
        transforms.RandFlip(prob=flip, spatial_axis=2),
        *([] if intensity is None else [_intensity(transforms, intensity)]),
        transforms.EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ])


def volume_eval_transform(size: tuple[int, int, int], intensity: str = "zscore"):
    """The whole volume resized (trilinear) to ``size`` ``(D, H, W)``, then the intensity
    normalisation: for evaluation, no randomness."""
    transforms = _needs("monai.transforms", "3-D evaluation")
    return transforms.Compose([transforms.Resize(tuple(size), mode="trilinear"), _intensity(transforms, intensity),
                               transforms.EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False)])


class VolumeFiles(ImageFiles):
    """Augmented crops of volumes, one sample per ``(path, index)`` of :func:`list_samples` or per
    ``(channel files, None)`` of a case (:func:`read_nnunet_dataset`), read by :func:`read_sample`
    (``spacing``, ``foreground``); keys, unreadable files and batches as in
    :class:`~sparkmim.data.ImageFiles`."""

    kind = "volume"

    def __init__(self, samples: list[tuple[Path | tuple[Path, ...], int | None]], transform, channels: int = 1,
                 max_skips: int = 64, spacing: tuple[float, float, float] | None = None, foreground: bool = False):
        self.files = [(f,) if isinstance(f, (str, Path)) else tuple(f) for f, _ in samples]  # a case: a file per channel
        super().__init__([files[0] for files in self.files], transform, channels, max_skips)
        self.series_index = [t for _, t in samples]
        self.spacing, self.foreground = spacing, foreground

    def name_of(self, index: int) -> str:
        t = self.series_index[index]
        return Path(self.paths[index]).name + ("" if t is None else f" [{t}]")

    def _read(self, index: int):
        return read_sample(self.files[index], self.channels, self.series_index[index], self.spacing, self.foreground)

    def _augment(self, volume, seed: int):
        self.transform.set_random_state(seed=seed % (2**32))
        return self.transform(volume)


def demo_volume_paths() -> list[Path]:
    """The demo volumes: small real MRI scans from nibabel's test data (nothing is downloaded)."""
    nib = _needs("nibabel", "the 3-D demo")
    data_path = Path(nib.__file__).parent / "tests" / "data"  # (nibabel.testing would import pytest)
    paths = [data_path / n for n in _DEMO_NAMES if (data_path / n).is_file()]
    if not paths:
        raise DataError(f"no demo volumes found in {data_path}")
    return paths
