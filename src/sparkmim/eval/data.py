"""Labelled folders of images or volumes: one sub-folder per class, and seeded stratified splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..modality import IMAGES, Modality
from .config import EvalConfig

__all__ = ["LabelledSamples", "scan_classes", "split_samples", "build_splits"]


class LabelledSamples(torch.utils.data.Dataset):
    """``(path, class index)`` samples with a transform, read as ``modality`` reads them."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform, channels: int,
                 modality: Modality = IMAGES):
        self.samples, self.classes, self.transform, self.channels = samples, classes, transform, channels
        self.modality = modality

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.modality.load(path, self.channels, self.transform), label


def scan_classes(root: str | Path, classes: list[str] | None = None,
                 modality: Modality = IMAGES) -> tuple[list[tuple[Path, int]], list[str]]:
    """Samples (images or volumes) under ``root/<class>/`` (searched recursively inside each class
    folder)."""
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
    samples = []
    for i, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if modality.is_sample_file(p) and p.is_file())
        samples += [(p, i) for p in files]
    if not samples:
        raise FileNotFoundError(f"no {modality.name} ({', '.join(modality.extensions())}) in the class folders of "
                                f"{root}")
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


def build_splits(cfg: EvalConfig, modality: Modality = IMAGES):
    """``(train_samples, val_samples, classes)`` of the labelled data, split as configured."""
    samples, classes = scan_classes(cfg.data, modality=modality)
    if cfg.val:
        val, _ = scan_classes(cfg.val, classes, modality)
        train = samples
    else:
        train, val = split_samples(samples, cfg.val_fraction, cfg.seed)
    if cfg.train_fraction < 1:
        _, train = split_samples(train, cfg.train_fraction, cfg.seed + 1)
    if not val:
        raise ValueError("the validation part is empty: give --val or more images per class")
    return train, val, classes
