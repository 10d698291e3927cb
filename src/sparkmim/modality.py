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

import numpy as np
import torch

from .config import DEMO_DATA, ConfigError, flag_of
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
from .inputs import listed_once

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
    models: str  # the models that read it, for messages
    recipes: str  # the recipes made for it, for messages
    demo_command: str  # the command that runs its demo
    slow_data_hint: str  # what else makes its data come faster, for the slow-data warning
    deepest_decoder_width: bool  # a new run's decoder takes the encoder's deepest width unless one is set
    other: Modality  # the modality a sample of this one is mistaken for (set below)

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

    def check_network(self, network, name: str) -> None:
        """The one rule between a model's name and the network built from it: the modality read
        from the name (:func:`modality_for`, decided before any model exists) must have the
        number of spatial dims of the network's first convolution; otherwise
        :class:`~sparkmim.config.ConfigError` naming both."""
        from .features import spatial_dims_of

        built = spatial_dims_of(network)
        if built != self.spatial_dims:
            raise ConfigError(f"{name} builds a {built}-D network (its first convolution is Conv{built}d), and "
                              f"sparkmim takes {name} as a model of {self.name} ({self.spatial_dims}-D): choose a "
                              f"model of {self.spatial_dims}-D convolutions (for nnU-Net plans a 3-D configuration "
                              f"such as 3d_fullres)", ["model"])

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
    reads: tuple[str, ...]  # the kinds of --data it reads (sparkmim.inputs)

    def data_source(self, cfg):
        """What ``--data`` is (:func:`~sparkmim.inputs.data_input`), decided once per run; no data
        at all, or a kind this modality does not read, is refused."""
        from .inputs import KINDS, data_input

        self.user_data(cfg)
        source = data_input(cfg.data)
        if source.kind not in self.reads:
            raise DataError(f"--data {source} is {KINDS[source.kind]}, and {cfg.model} is a {self.spatial_dims}-D "
                            f"model that takes {self.name}: choose {self.other.models}")
        return source

    def data_channels(self, source) -> int | None:
        """The channel count a data set declares (an nnU-Net dataset's ``dataset.json``, a cache's
        manifest), or None."""
        return None

    def pretrain_data(self, cfg, source=None) -> tuple[ImageFiles, tuple, tuple, dict[str, str]]:
        """The data set of ``source`` (:meth:`data_source`), its normalisation statistics, and the
        files known to be unusable before any is read (``{path: reason}``: listed but gone, or left
        out of a cache). Each kind this modality reads has its reader, ``_read_<kind>``."""
        source = source or self.data_source(cfg)
        return getattr(self, "_read_" + source.kind.replace("-", "_"))(cfg, source)

    def sample_size(self, path: Path, cfg) -> tuple[int, ...]:
        """The size of a sample file along each spatial axis, read from its header."""
        raise NotImplementedError

    def warn_if_small(self, cfg, paths: list[Path], count: int = 16) -> None:
        """Warn when the samples (the median over up to ``count`` files spread through ``paths``) are
        much smaller than the crop along an axis (the crop would upsample them more than 2x): a
        crop far larger than the data costs memory and time and teaches nothing more."""
        import statistics
        import warnings

        files = list(dict.fromkeys(paths))
        sizes = []
        for p in files[:: max(1, len(files) // count)][:count]:
            try:
                sizes.append(self.sample_size(Path(p), cfg))
            except Exception:  # an unreadable file is reported when it is read
                continue
        if not sizes:
            return
        typical = tuple(int(statistics.median(s[axis] for s in sizes)) for axis in range(len(sizes[0])))
        crop = self.input_shape(cfg)
        factor = max(c / max(t, 1) for c, t in zip(crop, typical))
        if factor <= 2:
            return
        flags = " and ".join(dict.fromkeys(flag_of(o) for o in self.crop_options()))
        warnings.warn(f"the {self.name} are about {'x'.join(map(str, typical))} (median of {len(sizes)} files), far "
                      f"smaller than the crop {'x'.join(map(str, crop))}, which upsamples them up to {factor:.0f}x along "
                      f"an axis and costs memory and time for nothing: lower {flags} to about the data's size, or "
                      f"start from a recipe ({self.recipes})", stacklevel=3)

    def user_data(self, cfg) -> bool:
        """Whether ``--data`` names the user's files (False: ``demo``, the built-in samples);
        refuses a config without data, which would otherwise start a long run on the demo."""
        if cfg.data is None:
            raise ConfigError(f"no data: give --data, a folder of {self.name} (searched recursively) or a text file "
                              f"listing their paths; --data demo takes the built-in demo {self.name}, as "
                              f"`{self.demo_command}` does", ["data"])
        return cfg.data != DEMO_DATA

    def listed(self, cfg, lister) -> list[Path]:
        """``lister(cfg.data)``, and a refusal that says so when the files are the other
        modality's (volumes for a 2-D model, images for a 3-D one), naming ``--model``."""
        source = Path(cfg.data)
        if source.is_file() and self.other_kind([source]):
            raise DataError(self.mismatch(source, cfg.model))
        try:
            paths = lister(source)
        except FileNotFoundError:
            if self.other_kind(_files_under(source)):
                raise DataError(self.mismatch(source, cfg.model)) from None
            raise
        if source.is_file() and not any(self.is_sample_file(p) for p in paths) and self.other_kind(paths):
            raise DataError(self.mismatch(source, cfg.model))
        return paths

    def other_kind(self, paths) -> Modality | None:
        """The other modality when ``paths`` hold files only it reads (.nii, .npy for volumes;
        .jpg, .png, ... for images; a .tif may be either), else None."""
        own = self.extensions()
        if any(self.other.is_sample_file(p) and not p.name.lower().endswith(own) for p in paths):
            return self.other
        return None

    def mismatch(self, source: Path, model: str) -> str:
        """The message for samples of the other modality given to a model of this one (``source``:
        a file or the folder or list that holds them)."""
        other = self.other
        holds = f"is {'an' if other.noun[0] in 'aeiou' else 'a'} {other.noun}" if source.is_file() and \
            other.is_sample_file(source) else f"holds {other.name}"
        return (f"{source} {holds}, and {model} is a {self.spatial_dims}-D model that takes {self.name}: choose "
                f"{other.models}")

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

    # -- segmentation (evaluate segment) ----------------------------------------------------------
    segment_batch: int  # crops per fine-tuning step unless --batch-size is given

    def read_labelled(self, files: tuple[Path, ...], label_file: Path, cfg) -> tuple[np.ndarray, np.ndarray]:
        """``(image (C, *S) float32, normalised as the encoder was pre-trained; label map (*S))``
        of one segmentation case: its channel files and its label file, as stored."""
        raise NotImplementedError

    def predict_case(self, network, x: torch.Tensor, crop: tuple[int, ...], stride: tuple[int, ...],
                     overlap: float) -> torch.Tensor:
        """The logits of ``network`` for one whole case ``x`` (1, C, *S)."""
        raise NotImplementedError

    def display_slice(self, image: np.ndarray, truth: np.ndarray, pred: np.ndarray):
        """The 2-D ``(image (C, H, W), truth, prediction)`` a picture shows of one case."""
        raise NotImplementedError

    # -- reconstructions --------------------------------------------------------------------------
    def reconstruct_transform(self, cfg, size: int, mean, std, patch: tuple[int, ...]):
        """How ``sparkmim reconstruct`` prepares a sample (normalised as in the run), and the
        reader of its files: an image with its short side ``size`` and its aspect ratio kept
        (each side cropped to a multiple of ``patch``); a volume resized whole to ``size`` and the
        run's depth."""
        raise NotImplementedError

    def rows(self, rec, names: list[str] | None, count: int):
        """The reconstruction of ``count`` samples as 2-D rows of a grid, and each row's label
        (None: unlabelled)."""
        raise NotImplementedError


class Images(Modality):
    name, noun, spatial_dims, in_chans = "images", "image", 2, (1, 3, 4)
    refused = ("spacing", "foreground_crop")  # voxel sizes and the non-zero box are the volumes'
    models, recipes, demo_command = "a 2-D model (e.g. --model resnet50)", "--config demo", "sparkmim demo"
    slow_data_hint = "; for many small files, tar shards read faster than a folder on network storage"
    deepest_decoder_width = False  # the paper's 768
    channels_last, channels_last_auto, cutmix = torch.channels_last, True, True

    def crop_options(self) -> tuple[str, ...]:
        return ("input_size", "input_size")

    reads = ("demo", "folder", "list", "shards")

    def _read_demo(self, cfg, source):
        photos = demo_photo_paths()
        return self._images(cfg, ImageFiles([photos[i % len(photos)] for i in range(cfg.demo_length)], None))

    def _read_folder(self, cfg, source):
        return self._images(cfg, ImageFiles(listed_once(lambda: self.listed(cfg, list_images)), None))

    def _read_list(self, cfg, source):
        paths, missing = drop_missing(self.listed(cfg, list_images), cfg)
        return self._images(cfg, ImageFiles(paths, None), missing)

    def _read_shards(self, cfg, source):
        from .shards import ShardImages, index_shards

        index = listed_once(lambda: index_shards(list(source.shards)))
        if not len(index):
            raise DataError(f"no images in the {len(source.shards)} shard(s) of {source}")
        return self._images(cfg, ShardImages(index, None))

    def _images(self, cfg, dataset: ImageFiles, missing: dict[str, str] | None = None):
        """``dataset`` (its files listed) with the channels, the statistics and the paper's
        augmentation of ``cfg``."""
        dataset.channels = cfg.in_chans
        if cfg.norm_stats == "data":
            mean, std = compute_stats(range(len(dataset)), cfg.in_chans, read=dataset.full_image)
        else:
            mean, std = default_stats(cfg.in_chans)
        dataset.transform = pretrain_transform(cfg.input_size, mean, std, scale=(cfg.crop_scale_min, 1.0))
        dataset.fast_decode = (cfg.input_size, cfg.crop_scale_min) if cfg.fast_decode else None
        return dataset, mean, std, missing or {}

    def is_sample_file(self, path: Path) -> bool:
        return path.suffix.lower() in IMAGE_EXTENSIONS

    def sample_size(self, path, cfg):
        from PIL import Image

        with Image.open(path) as im:
            return im.size[1], im.size[0]

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

    segment_batch = 8

    def read_labelled(self, files, label_file, cfg):
        from PIL import Image

        pil = load_image(files[0], cfg.in_chans)
        image = np.asarray(pil, dtype=np.float32).reshape(pil.height, pil.width, -1).transpose(2, 0, 1) / 255.0
        mean, std = default_stats(cfg.in_chans)
        image = (image - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
        with Image.open(label_file) as m:
            label = np.asarray(m)
        if label.ndim == 3:
            raise DataError(f"label map {label_file} has {label.shape[2]} colour channels: a label map is one "
                            f"channel of integer labels (0 = background)")
        return image, label

    def predict_case(self, network, x, crop, stride, overlap):
        import torch.nn.functional as F

        size = x.shape[2:]  # the whole image, padded up to a multiple of the encoder's stride
        pad = [(-n) % s for n, s in zip(size, stride)]
        xp = F.pad(x, [v for p in reversed(pad) for v in (0, p)], mode="replicate")
        return network(xp)[(..., *(slice(0, n) for n in size))]

    def display_slice(self, image, truth, pred):
        return image, truth, pred

    def reconstruct_transform(self, cfg, size: int, mean, std, patch):
        from torchvision.transforms import v2

        resize = v2.Compose([v2.PILToTensor(), v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC,
                                                         antialias=True), v2.ToDtype(torch.float32, scale=True),
                             v2.Normalize(mean, std)])

        def transform(image):
            x = resize(image)
            fit = [max(p, n - n % p) for n, p in zip(x.shape[-2:], patch)]
            return v2.functional.center_crop(x, fit)

        return transform, load_image

    def rows(self, rec, names, count):
        return rec, None


class Volumes(Modality):
    """Volumes (CT, MRI, microscopy stacks) or clips: ``(C, D, H, W)`` samples, each normalised
    on its own (``--intensity``); ``slice_names`` name the three central slices shown per sample."""

    name, noun, spatial_dims = "volumes", "volume", 3
    models = "a 3-D model (e.g. --model monai:resnet18 or nnunet:resenc_m)"
    recipes, demo_command = "--config demo3d or nnunet_resenc_l", "sparkmim demo --3d"
    slow_data_hint = ("; read the volumes once with `sparkmim preprocess DATA --out CACHE` and train on the cache "
                      "(--data CACHE), which reads each crop's region alone")
    deepest_decoder_width = True
    channels_last, channels_last_auto, cutmix = torch.channels_last_3d, False, False

    def __init__(self, slice_names: tuple[str, str, str] = VOLUME_SLICES):
        self.slice_names = slice_names

    def crop_options(self) -> tuple[str, ...]:
        return ("input_depth", "input_size", "input_size")

    reads = ("demo", "folder", "list", "nnunet-raw", "nnunet-preprocessed", "cache")

    # volumes are normalised one by one (--intensity), so the display statistics only map -2..2
    # standard deviations to the grey scale of the reconstruction images
    def _display_stats(self, cfg):
        if cfg.norm_stats == "data":
            raise ConfigError("volumes are normalised one by one (--intensity zscore or window:LOW:HIGH); "
                              "--norm-stats data is for images")
        return (0.5,) * cfg.in_chans, (0.25,) * cfg.in_chans

    def raw_samples(self, cfg, source) -> tuple[list, dict[str, str]]:
        """The samples of a folder, a file list, an nnU-Net raw dataset or the demo, as
        :func:`~sparkmim.volumes.read_sample` reads them (``(files, series index)``: a case's
        channel files, or one file; each volume of a 4-D series is a sample), and the listed files
        that do not exist."""
        from .volumes import demo_volume_paths, list_samples, list_volumes, read_nnunet_dataset

        if source.kind == "nnunet-raw":  # one multi-channel sample per case
            cases, channels = read_nnunet_dataset(source.path)
            self._check_channels(cfg, channels, f"the nnU-Net dataset {source}")
            return [(files, None) for files in cases], {}
        if source.kind == "demo":
            demo = [((path,), index) for path, index in list_samples(demo_volume_paths())]
            return [demo[i % len(demo)] for i in range(cfg.demo_length)], {}
        paths, missing = listed_once(lambda: self.listed(cfg, list_volumes)), {}
        if source.kind == "list":
            paths, missing = drop_missing(paths, cfg)
        return [((path,), index) for path, index in list_samples(paths)], missing

    def _read_raw(self, cfg, source):
        """Volume samples read from their files at every crop, with the 3-D augmentation."""
        from .config import parse_spacing
        from .volumes import VolumeFiles, volume_transform

        mean, std = self._display_stats(cfg)
        samples, missing = self.raw_samples(cfg, source)
        transform = volume_transform(self.input_shape(cfg), cfg.intensity, scale=(cfg.crop_scale_min, 1.0))
        dataset = VolumeFiles(samples, transform, cfg.in_chans, spacing=parse_spacing(cfg.spacing),
                              foreground=cfg.foreground_crop)
        return dataset, mean, std, missing

    _read_demo = _read_folder = _read_list = _read_nnunet_raw = _read_raw

    def _read_cache(self, cfg, source):
        """A cache of ``sparkmim preprocess``: its volumes read by region, normalised as raw ones."""
        from .arrays import ArrayVolumes, read_cache
        from .volumes import volume_transform

        mean, std = self._display_stats(cfg)
        volumes, bad, _ = read_cache(source.path, cfg)
        transform = volume_transform(self.input_shape(cfg), cfg.intensity, scale=(cfg.crop_scale_min, 1.0))
        return ArrayVolumes(volumes, transform, cfg.in_chans), mean, std, bad

    def _read_nnunet_preprocessed(self, cfg, source):
        """nnU-Net's preprocessed cases, read by region; nnU-Net normalised them, so no intensity
        normalisation is added, and its resampling and cropping stand (--spacing and
        --foreground-crop are refused)."""
        from .arrays import ArrayVolumes, nnunet_preprocessed_volumes
        from .volumes import volume_transform

        mean, std = self._display_stats(cfg)
        for option in ("spacing", "foreground_crop"):
            if getattr(cfg, option):
                raise ConfigError(f"--data {source} holds nnU-Net's preprocessed cases, already resampled and cropped "
                                  f"by nnU-Net: leave --{option.replace('_', '-')} out", [option])
        volumes, channels, _ = nnunet_preprocessed_volumes(source.path, cfg.model)
        self._check_channels(cfg, channels, f"the nnU-Net dataset {source}")
        transform = volume_transform(self.input_shape(cfg), None, scale=(cfg.crop_scale_min, 1.0))
        return ArrayVolumes(volumes, transform, cfg.in_chans), mean, std, {}

    def data_channels(self, source) -> int | None:
        import json

        from .inputs import CACHE_MANIFEST

        if source.kind in ("nnunet-raw", "nnunet-preprocessed"):
            meta = json.loads((source.path / "dataset.json").read_text())
            names = meta.get("channel_names", meta.get("modality"))
            return len(names) if isinstance(names, dict) else None
        if source.kind == "cache":
            return json.loads((source.path / CACHE_MANIFEST).read_text())["settings"]["in_chans"]
        return None

    @staticmethod
    def _check_channels(cfg, channels: list[str], what: str) -> None:
        if len(channels) != cfg.in_chans:
            raise ConfigError(f"{what} has {len(channels)} channel(s) ({', '.join(channels)}): use --in-chans "
                              f"{len(channels)}, not {cfg.in_chans}", ["in_chans"])

    def is_sample_file(self, path: Path) -> bool:
        from .volumes import is_volume_file

        return is_volume_file(path)

    def sample_size(self, path, cfg):
        from .config import parse_spacing
        from .volumes import volume_shape

        return volume_shape(path, parse_spacing(cfg.spacing))

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

    segment_batch = 2

    def read_labelled(self, files, label_file, cfg):
        from .volumes import _intensity, _needs, read_sample, read_volume

        image = read_sample(files, cfg.in_chans)
        label = read_volume(label_file, 1)[0]
        transforms = _needs("monai.transforms", "3-D evaluation")
        return np.asarray(_intensity(transforms, cfg.intensity)(image), dtype=np.float32), label

    def predict_case(self, network, x, crop, stride, overlap):
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(x, crop, 1, network, overlap=overlap, mode="gaussian")

    def display_slice(self, image, truth, pred):
        k = int(np.argmax((truth > 0).reshape(truth.shape[0], -1).sum(1)))  # the most foreground
        return image[:, k], truth[k], pred[k]

    def reconstruct_transform(self, cfg, size: int, mean, std, patch):
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
IMAGES.other, VOLUMES.other, CLIPS.other = VOLUMES, IMAGES, IMAGES
"""By number of spatial dims (a model's ``spatial_dims``), where no backbone name is at hand."""


def modality_for(model: str) -> Modality:
    """The modality of a backbone by name: volumes for ``monai:NAME`` and ``nnunet:NAME``, clips
    for torchvision video models, images for everything else."""
    from .backbones import VOLUME_SOURCES, is_video_model

    if model.startswith(VOLUME_SOURCES):
        return VOLUMES
    return CLIPS if is_video_model(model) else IMAGES


def _files_under(source: Path, limit: int = 10_000) -> list[Path]:
    """Up to ``limit`` files under a folder (or the file itself), to tell what it holds."""
    if source.is_file():
        return [source]
    found = []
    for p in source.rglob("*") if source.is_dir() else ():
        found.append(p)
        if len(found) >= limit:
            break
    return found


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
