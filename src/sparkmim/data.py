"""Image data (the built-in demo photographs, reading, the paper's augmentation, evaluation transforms),
and what samples of any modality share: the epoch sampler, the unreadable-file list, the data errors."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .inputs import PathList
from .masking import seed_for

log = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "demo_photo_paths", "pretrain_transform",
    "eval_transform", "finetune_transform",
    "list_images", "list_files", "read_path_list", "is_image_name", "load_image", "read_image", "ImageFiles", "EpochSampler", "default_stats", "compute_stats",
    "DataError", "BadFiles",
]


class DataError(ValueError):
    """The data cannot be used as given (too many unreadable files, no readable image)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}

# real photographs shipped inside scikit-image (synthetic test patterns are left out)
_DEMO_NAMES = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
]


def demo_photo_paths() -> list[Path]:
    """Paths of the demo photographs; they ship with scikit-image, so nothing is downloaded."""
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError("the demo data set needs scikit-image: pip install scikit-image") from e
    folder = Path(skimage.data.__file__).parent
    paths = [folder / n for n in _DEMO_NAMES if (folder / n).is_file()]
    if not paths:
        raise RuntimeError(f"no demo photographs found in {folder}")
    return paths


def pretrain_transform(size: int | tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       scale=(0.67, 1.0)):
    """RandomResizedCrop (bicubic) + horizontal flip + normalisation, as in the paper."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def eval_transform(size: int, crop_ratio: float, mean, std):
    """Resize to ``size / crop_ratio`` (bicubic), centre-crop ``size``, normalise: evaluation."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(round(size / crop_ratio), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def finetune_transform(size: int, scale: tuple[float, float], hflip: float, mean, std):
    """RandomResizedCrop (bicubic, area fraction ``scale``), horizontal flip, normalise: fine-tuning."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(hflip),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for RGB; for other channel counts mean 0.5 and std 0.25 per channel."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 4:
        return IMAGENET_MEAN + (0.5,), IMAGENET_STD + (0.25,)
    return (0.5,) * channels, (0.25,) * channels


def list_images(source: str | Path) -> Sequence[Path]:
    """All image files under a folder (recursively, sorted; class sub-folders are just folders;
    label maps left out: :func:`~sparkmim.inputs.walk_files`), or the paths listed in a text file
    (one per line, relative to the file's folder; # comments)."""
    return list_files(source, is_image_name, "images", IMAGE_EXTENSIONS)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_files(source: str | Path, accept, noun: str, extensions: tuple[str, ...]) -> Sequence[Path]:
    """The sample files whose names ``accept`` takes under a folder (recursively, sorted, label
    maps left out; :func:`~sparkmim.inputs.walk_files`), or the paths a text file lists
    (:func:`read_path_list`). A sample file itself is refused: ``--data`` names a folder or a list
    (``noun``, e.g. ``"images"``, and ``extensions`` word the messages)."""
    from .inputs import walk_files

    source = Path(source)
    if source.is_dir():
        paths = walk_files(source, accept)
        if not paths:
            raise FileNotFoundError(f"no {noun} ({', '.join(extensions)}) found under {source}")
        return paths
    if source.is_file():
        if accept(source.name):
            raise DataError(f"--data {source} is a single file: give a folder of {noun} (searched recursively) or a "
                            f"text file listing their paths, one per line")
        return read_path_list(source, noun)
    raise FileNotFoundError(f"data path {source} does not exist: give a folder of {noun} or a text file of paths")


def read_path_list(source: Path, noun: str = "files") -> list[Path]:
    """The paths a text file lists, one per line (relative ones from the file's folder; blank lines
    and ``#`` comments skipped). :class:`DataError` for a file that is not UTF-8 text."""
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--data {source} is neither a folder nor a text file of paths (it is not UTF-8 text): give a "
                        f"folder of {noun} or a text file listing their paths, one per line") from e
    lines = [ln.strip() for ln in text.splitlines()]
    paths = [Path(ln) if Path(ln).is_absolute() else source.parent / ln for ln in lines if ln and not ln.startswith("#")]
    if not paths:
        raise FileNotFoundError(f"the file list {source} names no {noun}")
    return paths


def load_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Open any Pillow-readable image as 8-bit L, RGB or RGBA: palette, CMYK, LA, 16-bit and float
    images are converted (high-bit-depth images are scaled by their type's range)."""
    mode = _MODES.get(channels)
    if mode is None:
        raise ValueError(f"image files can be read as 1, 3 or 4 channels, not {channels}")
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(im).astype(np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            if im.mode == "F":
                top = max(float(arr.max()), 1e-12) if arr.max() > 1.0 else 1.0
            im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        elif im.mode == "P":
            im = im.convert("RGBA")
        if im.mode != mode:
            if mode == "L" and im.mode in ("RGBA", "LA"):
                im = im.convert("RGB")
            im = im.convert(mode)
        return im


def _draft_factor(size: tuple[int, int], min_side: int, scale_min: float) -> int:
    """Largest JPEG reduction (1, 2, 4 or 8) after which even the smallest crop
    RandomResizedCrop can draw (area ``scale_min``, aspect 3:4) still has ``min_side`` pixels on
    its short side, so the crop is never upsampled where the full decode would downsample it."""
    w, h = size
    shortest = (scale_min * w * h * 3 / 4) ** 0.5
    k = 1
    while k < 8 and shortest / (2 * k) >= min_side:
        k *= 2
    return k


def read_image(path: str | Path, channels: int = 3, min_side: int | None = None, scale_min: float = 1.0,
               data: bytes | None = None):
    """Decode an image for training crops of ``min_side`` pixels: a JPEG far larger than that is
    decoded at 1/2, 1/4 or 1/8 scale by libjpeg (Pillow draft mode); another RGB or grayscale
    JPEG by torchvision's libjpeg-turbo decoder (a uint8 tensor); anything else, or any JPEG
    these cannot read, by :func:`load_image`. Without ``min_side``, always :func:`load_image`.
    ``data``: the file's bytes, already read (from a tar shard; ``path`` then only names it)."""
    import io

    path = Path(path)
    source = path if data is None else io.BytesIO(data)
    if min_side and channels in (1, 3) and path.suffix.lower() in (".jpg", ".jpeg"):
        mode = _MODES[channels]
        try:
            with Image.open(source) as im:
                if im.format == "JPEG" and im.mode in ("RGB", "L"):
                    k = _draft_factor(im.size, min_side, scale_min)
                    if k > 1:
                        im.draft(mode, (im.size[0] // k, im.size[1] // k))
                        im.load()
                        return im.convert(mode)
                    with warnings.catch_warnings():  # torchvision >= 0.29 flags its decoders as deprecated
                        warnings.simplefilter("ignore", DeprecationWarning)
                        from torchvision.io import ImageReadMode, decode_jpeg, read_file

                        read_mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
                        raw = read_file(str(path)) if data is None else torch.frombuffer(bytearray(data), dtype=torch.uint8)
                        return decode_jpeg(raw, mode=read_mode)
        except Exception:  # unusual JPEG (CMYK, progressive edge cases): the general reader decides
            pass
        if data is not None:
            source.seek(0)
    return load_image(source, channels)


class ImageFiles(Dataset):
    """Augmented crops of image files. Indexed by ``(seed, epoch, index)`` keys from
    :class:`EpochSampler`, so each sample's augmentation depends only on its key, whatever
    worker computes it: data order and augmentation resume exactly.

    Each item is ``(image, None, key)``, or ``(None, (path, reason), key)`` for a file that cannot
    be read.
    :meth:`collate` leaves unreadable files out of their batch, so no image stands in for another
    (the batch is smaller by one per unreadable file); only a batch of unreadable files alone is
    given one image, the next readable file of the data set, so every step has data.
    """

    kind = "image"  # what a sample is, in messages

    def __init__(self, paths: list[Path], transform, channels: int = 3, max_skips: int = 64,
                 fast_decode: tuple[int, float] | None = None):
        self.paths = paths if isinstance(paths, PathList) else list(paths)  # a long listing stays compact
        self.transform = transform
        self.channels = channels
        self.max_skips = max_skips
        # (crop size, smallest crop area fraction): decode JPEGs with read_image's fast paths
        self.fast_decode = fast_decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key) -> tuple[torch.Tensor | None, tuple[str, str] | None, tuple[int, int, int]]:
        key = key if isinstance(key, tuple) else (0, 0, key)
        seed, epoch, index = key
        try:
            image = self._read(index)
        except Exception as e:  # corrupt, truncated, unsupported, vanished: reported, never a crash
            return None, (str(self.paths[index]), _reason(e)), key
        return self._augment(image, seed_for(seed, epoch, index)), None, key

    def _read(self, index: int):
        """The decoded file ``index`` (raises for a file that cannot be used)."""
        if self.fast_decode:
            return read_image(self.paths[index], self.channels, *self.fast_decode)
        return load_image(self.paths[index], self.channels)

    def full_image(self, index: int):
        """Image ``index`` decoded whole, as a Pillow image (for statistics)."""
        return load_image(self.paths[index], self.channels)

    def _augment(self, image, seed: int):
        """The transform of ``image`` with random numbers from ``seed`` alone."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)

    def name_of(self, index: int) -> str:
        """The file name of sample ``index``, for labels."""
        return Path(self.paths[index]).name

    def readable(self, key) -> tuple[torch.Tensor, list[tuple[str, str]], int]:
        """The image of ``key`` or, if it is unreadable, of the next readable file (at most
        ``max_skips`` further on, and never round the data set twice); the distinct unreadable
        files met on the way; and the index of the sample returned."""
        seed, epoch, index = key
        bad: dict[str, str] = {}
        for k in range(min(self.max_skips + 1, len(self.paths))):
            image, problem, _ = self[(seed, epoch, (index + k) % len(self.paths))]
            if image is not None:
                return image, list(bad.items()), (index + k) % len(self.paths)
            bad.setdefault(*problem)
        first, reason = next(iter(bad.items()))
        if k + 1 == len(self.paths):  # every sample tried
            files = len(set(map(str, self.paths)))
            which = f"the only {self.kind} file cannot" if files == 1 else f"none of the {files} {self.kind} files can"
            raise DataError(f"{which} be read ({first}: {reason}); check the data")
        raise DataError(f"{len(bad)} {self.kind} files in a row are unreadable, from {first} ({reason}); check the data")

    def collate(self, items: list) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        """``(images, unreadable)``: the readable images of a batch stacked, and the
        ``(path, reason)`` of its unreadable files."""
        images = [im for im, _, _ in items if im is not None]
        bad = [problem for _, problem, _ in items if problem is not None]
        if not images:
            image, more, _ = self.readable(items[0][2])
            images, bad = [image], bad + [p for p in more if p not in bad]
        return torch.stack(images), bad


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


class BadFiles:
    """The distinct unreadable files of a run, in the order they were found, with reasons; the
    new ones are appended to ``bad_images.txt`` (one ``path<TAB>reason`` line each)."""

    def __init__(self, known: dict[str, str] | None = None):
        self.files: dict[str, str] = dict(known or {})
        self.pending: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.files)

    def add(self, problems) -> None:
        self.pending.extend(problems)

    def merge(self, problems) -> list[tuple[str, str]]:
        """Record ``problems``; returns those not seen before (each path once)."""
        new = []
        for path, reason in problems:
            if path not in self.files:
                self.files[path] = reason
                new.append((path, reason))
        return new

    @staticmethod
    def write(path: Path, problems) -> None:
        if problems:
            with open(path, "a") as f:
                f.writelines(f"{p}\t{r}\n" for p, r in problems)

class EpochSampler(Sampler):
    """Yields ``(seed, epoch, index)`` keys: a seeded permutation per epoch, split over ranks,
    truncated to whole batches; ``start`` skips what a resumed run already consumed."""

    def __init__(self, length: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 kind: str = "sample"):
        self.length, self.batch_size, self.seed, self.rank, self.world = length, batch_size, seed, rank, world
        self.epoch, self.start = 0, 0
        if self.batches_per_epoch() < 1:
            raise DataError(f"{length} {kind}s are fewer than one batch of {batch_size} x {world} device(s); use a "
                            f"smaller batch size or more data")

    def batches_per_epoch(self) -> int:
        return self.length // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch * self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size - self.start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        g = torch.Generator().manual_seed(seed_for(self.seed, self.epoch, -1))
        order = torch.randperm(self.length, generator=g)
        n = self.batches_per_epoch() * self.batch_size * self.world
        mine = order[:n][self.rank::self.world].tolist()
        for i in mine[self.start:]:
            yield self.seed, self.epoch, i


def compute_stats(paths, channels: int, limit: int = 500, size: int = 64, read=None):
    """Per-channel mean and std of up to ``limit`` images spread over ``paths`` (resized to
    ``size``), in [0, 1] units; ``read(item)`` decodes one (default: :func:`load_image` of a path)."""
    read = read or (lambda p: load_image(p, channels))
    total, total_sq, n = np.zeros(channels), np.zeros(channels), 0
    for p in paths[:: max(1, len(paths) // limit)][:limit]:
        try:
            arr = np.asarray(read(p).resize((size, size)), dtype=np.float64) / 255.0
        except Exception:
            continue
        arr = arr.reshape(-1, channels)
        total += arr.sum(0)
        total_sq += (arr**2).sum(0)
        n += arr.shape[0]
    if n == 0:
        raise RuntimeError("no readable image to compute normalisation statistics from")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
