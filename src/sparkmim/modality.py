"""Images or volumes, decided once from the backbone: one value that says how samples are listed,
read, augmented, normalised, shown and laid out in memory.

:func:`modality_for` names it from a backbone's name (``monai:*`` and torchvision video models take
volumes and clips, everything else images); :data:`MODALITIES` gives it by number of spatial dims
(a model's ``spatial_dims``). The run, evaluation, ``sparkmim reconstruct`` and the reconstruction
grids receive the value and ask it; none of them asks which one it is.

Everything about volumes is imported lazily: MONAI, nibabel and tifffile are an optional extra.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError
from .data import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageFiles,
    compute_stats,
    default_stats,
    demo_photo_paths,
    eval_transform,
    finetune_transform,
    list_images,
    load_image,
    pretrain_transform,
)

__all__ = ["Modality", "Images", "Volumes", "IMAGES", "VOLUMES", "CLIPS", "MODALITIES", "modality_for",
           "VOLUME_SLICES", "CLIP_SLICES"]

VOLUME_SLICES = ("axial", "coronal", "sagittal")  # slices across depth, height and width of a scan
CLIP_SLICES = ("depth", "height", "width")  # the same slices of a video clip (depth: time)


class Modality:
    """What differs between images and volumes, asked by everything that handles samples.

    Attributes:
        name: ``"images"`` or ``"volumes"``.
        noun: one sample (``"image"``, ``"volume"``), for messages.
        spatial_dims: 2 or 3.
        channels_last: the memory format of ``--channels-last true``.
        channels_last_auto: whether ``--channels-last auto`` turns it on for CUDA (measured for
            images; not measured for volumes, which stay contiguous).
        cutmix: whether fine-tuning can cut boxes between samples.
    """

    name: str
    noun: str
    spatial_dims: int
    channels_last: torch.memory_format
    channels_last_auto: bool
    cutmix: bool
    in_chans: tuple[int, ...] | None = None  # the channel counts it reads (None: any)
    refused: tuple[str, ...] = ()  # options of the other modality, refused when set

    def check(self, cfg) -> None:
        """Refuse, with :class:`~sparkmim.config.ConfigError`, settings this modality cannot read
        (a channel count, options of the other modality)."""
        if self.in_chans is not None and cfg.in_chans not in self.in_chans:
            raise ConfigError(f"{self.name} have {', '.join(map(str, self.in_chans))} channels, got --in-chans "
                              f"{cfg.in_chans} (any count is for volumes, with a 3-D model)", ["in_chans"])
        for option in self.refused:
            if getattr(cfg, option, None):
                raise ConfigError(f"--{option.replace('_', '-')} is not for {self.name}: {cfg.model} takes "
                                  f"{self.name}", [option])

    # -- shapes ---------------------------------------------------------------------------------
    def input_shape(self, cfg) -> tuple[int, ...]:
        """The input of a config with ``input_size`` (and ``input_depth``), one size per axis."""
        return tuple(getattr(cfg, option) or cfg.input_size for option in self.crop_options())

    def crop_options(self) -> tuple[str, ...]:
        """The option that sets the crop along each spatial axis."""
        raise NotImplementedError

    def memory_format(self, value: str, device: torch.device) -> torch.memory_format:
        """The layout of models and inputs for a config's ``channels_last`` (``auto``, ``true`` or
        ``false``). ``auto``: channels-last on CUDA where it was measured faster (tensor-core
        convolutions), contiguous on CPU (where a convolution's weight gradient is much slower
        channels-last)."""
        if value not in ("auto", "true", "false"):
            raise ConfigError(f"channels_last must be auto, true or false, got {value!r}")
        on = value == "true" or (value == "auto" and device.type == "cuda" and self.channels_last_auto)
        return self.channels_last if on else torch.contiguous_format

    # -- pre-training data ----------------------------------------------------------------------
    def pretrain_data(self, cfg) -> tuple[ImageFiles, tuple, tuple, dict[str, str]]:
        """The data set, its normalisation statistics, and the listed files that do not exist
        (``{path: reason}``; a file list may name files that are gone)."""
        raise NotImplementedError

    # -- labelled data (evaluation) ---------------------------------------------------------------
    def is_sample_file(self, path: Path) -> bool:
        raise NotImplementedError

    def extensions(self) -> tuple[str, ...]:
        raise NotImplementedError

    def norm_stats(self, cfg, paths: list[Path]) -> tuple[tuple | None, tuple | None]:
        """Per-channel mean and std the samples are normalised with (None where each sample is
        normalised on its own)."""
        raise NotImplementedError

    def eval_transform(self, cfg, mean, std):
        """The whole sample, resized to the input, normalised: no randomness."""
        raise NotImplementedError

    def finetune_transform(self, cfg, mean, std):
        """Random crops and flips of fine-tuning."""
        raise NotImplementedError

    def load(self, path, channels: int, transform):
        """One labelled sample read from ``path`` and transformed."""
        raise NotImplementedError

    # -- reconstructions --------------------------------------------------------------------------
    def reconstruct_transform(self, cfg, size: int, mean, std):
        """How ``sparkmim reconstruct`` prepares a sample: resized whole to ``size`` (and the run's
        depth), normalised as in the run."""
        raise NotImplementedError

    def rows(self, rec, names: list[str] | None, count: int):
        """The reconstruction of ``count`` samples as 2-D rows of a grid, and each row's label
        (None: unlabelled)."""
        raise NotImplementedError


class Images(Modality):
    name, noun, spatial_dims, in_chans = "images", "image", 2, (1, 3, 4)
    refused = ("spacing", "foreground_crop")  # voxel sizes and the non-zero box are the volumes'
    channels_last, channels_last_auto, cutmix = torch.channels_last, True, True

    def crop_options(self) -> tuple[str, ...]:
        return ("input_size", "input_size")

    def pretrain_data(self, cfg):
        missing: dict[str, str] = {}
        if cfg.data:
            paths = list_images(cfg.data)
            if Path(cfg.data).is_file():
                paths, missing = drop_missing(paths, cfg)
        else:
            photos = demo_photo_paths()
            paths = [photos[i % len(photos)] for i in range(cfg.demo_length)]
        if cfg.norm_stats == "data":
            mean, std = compute_stats(paths, cfg.in_chans)
        else:
            mean, std = default_stats(cfg.in_chans)
        transform = pretrain_transform(cfg.input_size, mean, std, scale=(cfg.crop_scale_min, 1.0))
        fast = (cfg.input_size, cfg.crop_scale_min) if cfg.fast_decode else None
        return ImageFiles(paths, transform, cfg.in_chans, fast_decode=fast), mean, std, missing

    def is_sample_file(self, path: Path) -> bool:
        return path.suffix.lower() in IMAGE_EXTENSIONS

    def extensions(self) -> tuple[str, ...]:
        return IMAGE_EXTENSIONS

    def norm_stats(self, cfg, paths):
        return compute_stats(paths, cfg.in_chans) if cfg.norm_stats == "data" else default_stats(cfg.in_chans)

    def eval_transform(self, cfg, mean, std):
        return eval_transform(cfg.input_size, cfg.crop_ratio, mean, std)

    def finetune_transform(self, cfg, mean, std):
        return finetune_transform(cfg.input_size, (cfg.crop_scale_min, 1.0), cfg.hflip, mean, std)

    def load(self, path, channels: int, transform):
        return transform(load_image(path, channels))

    def reconstruct_transform(self, cfg, size: int, mean, std):
        return eval_transform(size, 1.0, mean, std), load_image

    def rows(self, rec, names, count):
        return rec, None


class Volumes(Modality):
    """Volumes (CT, MRI, microscopy stacks) or clips: ``(C, D, H, W)`` samples, each normalised
    on its own (``--intensity``); ``slice_names`` name the three central slices shown per sample."""

    name, noun, spatial_dims = "volumes", "volume", 3
    channels_last, channels_last_auto, cutmix = torch.channels_last_3d, False, False

    def __init__(self, slice_names: tuple[str, str, str] = VOLUME_SLICES):
        self.slice_names = slice_names

    def crop_options(self) -> tuple[str, ...]:
        return ("input_depth", "input_size", "input_size")

    def pretrain_data(self, cfg):
        """Volume samples (each volume of a 4-D series is one), the 3-D augmentation, and display
        statistics: volumes are normalised one by one (``--intensity``), so the statistics
        returned only map -2..2 standard deviations to the grey scale of the reconstruction
        images."""
        from .config import parse_spacing
        from .volumes import (
            VolumeFiles,
            demo_volume_paths,
            is_nnunet_dataset,
            is_volume_file,
            list_samples,
            list_volumes,
            read_nnunet_dataset,
            volume_transform,
        )

        if cfg.norm_stats == "data":
            raise ConfigError("volumes are normalised one by one (--intensity zscore or window:LOW:HIGH); "
                              "--norm-stats data is for images")
        missing: dict[str, str] = {}
        if cfg.data and is_nnunet_dataset(cfg.data):  # one multi-channel sample per case
            cases, channels = read_nnunet_dataset(cfg.data)
            samples = [(files, None) for files in cases]
            if len(channels) != cfg.in_chans:
                raise ConfigError(f"the nnU-Net dataset {cfg.data} has {len(channels)} channel(s) ({', '.join(channels)}): "
                                  f"use --in-chans {len(channels)}, not {cfg.in_chans}", ["in_chans"])
        elif cfg.data:
            paths = list_volumes(cfg.data)
            if Path(cfg.data).is_file() and not is_volume_file(Path(cfg.data)):  # a list of files
                paths, missing = drop_missing(paths, cfg)
            samples = list_samples(paths)
        else:
            demo = list_samples(demo_volume_paths())
            samples = [demo[i % len(demo)] for i in range(cfg.demo_length)]
        transform = volume_transform(self.input_shape(cfg), cfg.intensity, scale=(cfg.crop_scale_min, 1.0))
        mean, std = (0.5,) * cfg.in_chans, (0.25,) * cfg.in_chans
        dataset = VolumeFiles(samples, transform, cfg.in_chans, spacing=parse_spacing(cfg.spacing),
                              foreground=cfg.foreground_crop)
        return dataset, mean, std, missing

    def is_sample_file(self, path: Path) -> bool:
        from .volumes import is_volume_file

        return is_volume_file(path)

    def extensions(self) -> tuple[str, ...]:
        from .volumes import VOLUME_EXTENSIONS

        return VOLUME_EXTENSIONS

    def norm_stats(self, cfg, paths):
        return None, None  # normalised one by one (--intensity)

    def eval_transform(self, cfg, mean, std):
        from .volumes import volume_eval_transform

        return volume_eval_transform(self.input_shape(cfg), cfg.intensity)

    def finetune_transform(self, cfg, mean, std):
        from .volumes import volume_transform

        return volume_transform(self.input_shape(cfg), cfg.intensity, (cfg.crop_scale_min, 1.0), cfg.hflip)

    def load(self, path, channels: int, transform):
        from .volumes import read_volume

        if hasattr(transform, "set_random_state"):  # MONAI's own generator, seeded from torch's
            transform.set_random_state(seed=int(torch.randint(2**31, (1,))))
        return transform(read_volume(path, channels))

    def reconstruct_transform(self, cfg, size: int, mean, std):
        from .volumes import read_volume, volume_eval_transform

        return volume_eval_transform((cfg.input_depth or size, size, size), cfg.intensity), read_volume

    def rows(self, rec, names, count):
        from .visualize import orthogonal_slices

        shown = (names or [f"volume {i}" for i in range(count)])[:count]
        labels = [f"{name}\n{axis}" for name in shown for axis in self.slice_names]
        return orthogonal_slices(rec), labels


IMAGES = Images()
VOLUMES = Volumes()
CLIPS = Volumes(CLIP_SLICES)
MODALITIES = {2: IMAGES, 3: VOLUMES}
"""By number of spatial dims (a model's ``spatial_dims``), where no backbone name is at hand."""


def modality_for(model: str) -> Modality:
    """The modality of a backbone by name: volumes for ``monai:NAME`` and ``nnunet:NAME``, clips
    for torchvision video models, images for everything else."""
    from .backbones import VOLUME_SOURCES, is_video_model

    if model.startswith(VOLUME_SOURCES):
        return VOLUMES
    return CLIPS if is_video_model(model) else IMAGES


def drop_missing(paths: list[Path], cfg) -> tuple[list[Path], dict[str, str]]:
    """The listed files that exist, and ``{path: reason}`` for those that do not; refuses a list
    of which none, or more than ``--max-bad-fraction``, exist."""
    missing = {str(p): "FileNotFoundError: no such file" for p in paths if not p.is_file()}
    present = [p for p in paths if str(p) not in missing]
    if not present:
        raise DataError(f"none of the {len(missing)} files listed in {cfg.data} exist (first: {next(iter(missing))})")
    if len(missing) > cfg.max_bad_fraction * len(paths):
        raise DataError(f"{len(missing)} of the {len(paths)} files listed in {cfg.data} do not exist (more than "
                        f"--max-bad-fraction {cfg.max_bad_fraction:g}; first: {next(iter(missing))})")
    return present, missing
