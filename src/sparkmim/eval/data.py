"""Labelled image folders: one sub-folder per class, seeded stratified splits, and the transforms
of evaluation and fine-tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import IMAGE_EXTENSIONS, load_image
from .config import EvalConfig

__all__ = ["LabelledImages", "scan_classes", "split_samples", "eval_transform", "train_transform", "build_splits"]


class LabelledImages(torch.utils.data.Dataset):
    """``(path, class index)`` samples with a transform; images are read with :func:`load_image`
    (volumes, with ``volumes=True``, with :func:`~sparkmim.volumes.read_volume`)."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform, channels: int,
                 volumes: bool = False):
        self.samples, self.classes, self.transform, self.channels = samples, classes, transform, channels
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        if self.volumes:
            from ..volumes import read_volume

            if hasattr(self.transform, "set_random_state"):  # MONAI's own generator, seeded from torch's
                self.transform.set_random_state(seed=int(torch.randint(2**31, (1,))))
            return self.transform(read_volume(path, self.channels)), label
        return self.transform(load_image(path, self.channels)), label


def scan_classes(root: str | Path, classes: list[str] | None = None,
                 volumes: bool = False) -> tuple[list[tuple[Path, int]], list[str]]:
    """Images (or volumes) under ``root/<class>/`` (searched recursively inside each class folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"labelled data folder {root} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise ValueError(f"{root} must hold one sub-folder per class (at least 2), found {len(classes)}")
    elif set(found) - set(classes):
        raise ValueError(f"{root} has classes not in the training folder: {sorted(set(found) - set(classes))}")
    if volumes:
        from ..volumes import VOLUME_EXTENSIONS, is_volume_file

        wanted, extensions = is_volume_file, VOLUME_EXTENSIONS
    else:
        wanted, extensions = (lambda p: p.suffix.lower() in IMAGE_EXTENSIONS), IMAGE_EXTENSIONS
    samples = []
    for i, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if wanted(p) and p.is_file())
        samples += [(p, i) for p in files]
    if not samples:
        kind = "volumes" if volumes else "images"
        raise FileNotFoundError(f"no {kind} ({', '.join(extensions)}) in the class folders of {root}")
    return samples, classes


def split_samples(samples, fraction: float, seed: int):
    """A seeded, class-stratified split: ``(kept, held_out)`` with ``fraction`` of each class held out."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    kept, held = [], []
    for c in sorted(by_class):
        items = by_class[c]
        order = rng.permutation(len(items))
        n_held = min(len(items) - 1, max(1, round(len(items) * fraction))) if len(items) > 1 else 0
        held += [items[i] for i in order[:n_held]]
        kept += [items[i] for i in order[n_held:]]
    return kept, held


def eval_transform(size: int, crop_ratio: float, mean, std):
    """Resize to ``size / crop_ratio`` (bicubic), centre-crop ``size``, normalise."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(round(size / crop_ratio), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def train_transform(cfg: EvalConfig, mean, std):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(cfg.input_size, scale=(cfg.crop_scale_min, 1.0),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def build_splits(cfg: EvalConfig, volumes: bool = False):
    """``(train_samples, val_samples, classes)`` of the labelled data, split as configured."""
    samples, classes = scan_classes(cfg.data, volumes=volumes)
    if cfg.val:
        val, _ = scan_classes(cfg.val, classes, volumes)
        train = samples
    else:
        train, val = split_samples(samples, cfg.val_fraction, cfg.seed)
    if cfg.train_fraction < 1:
        _, train = split_samples(train, cfg.train_fraction, cfg.seed + 1)
    if not val:
        raise ValueError("the validation part is empty: give --val or more images per class")
    return train, val, classes
