"""A synthetic 3-D segmentation task that a CPU can run: tubes among blobs and plates.

Every object has the same intensity distribution; only shape and context tell a tube (label 1)
from a blob or a plate (background). Volumes carry a smooth random texture and noise. Written as
an nnU-Net raw dataset (``dataset.json``, ``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``)
plus a folder of unlabelled volumes for pre-training:

    python benchmarks/seg_shapes.py --out /tmp/shapes --size 64 --unlabelled 200 --labelled 32 --val 16

``OUT/unlabelled/*.nii.gz``, ``OUT/train`` (nnU-Net raw dataset) and ``OUT/val`` (the same layout).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Smooth random texture: coarse noise upsampled (trilinear) to ``size``^3, unit spread."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.standard_normal((1, 1, scale, scale, scale)).astype(np.float32))
    fine = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0].numpy()
    return fine / (fine.std() + 1e-6)


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def make_volume(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image float32, label uint8)`` pair of ``size``^3 voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
    objects = np.zeros(size**3, bool)
    tubes = np.zeros(size**3, bool)
    for _ in range(int(rng.integers(2, 4))):  # tubes: long thin cylinders along a random direction
        a, b = rng.uniform(0.1 * size, 0.9 * size, 3), rng.uniform(0.1 * size, 0.9 * size, 3)
        if np.linalg.norm(b - a) < 0.5 * size:
            b = a + (b - a) / max(np.linalg.norm(b - a), 1e-6) * 0.5 * size
        tube = _segment_distance(grid, a, np.clip(b, 0, size - 1)) < rng.uniform(2.0, 3.5) * size / 64
        tubes |= tube
    for _ in range(int(rng.integers(2, 5))):  # blobs: ellipsoids
        c, r = rng.uniform(0.15 * size, 0.85 * size, 3), rng.uniform(0.06, 0.14, 3) * size
        objects |= (((grid - c) / r) ** 2).sum(1) < 1
    for _ in range(int(rng.integers(1, 3))):  # plates: thin slabs of limited extent
        c, n = rng.uniform(0.2 * size, 0.8 * size, 3), rng.standard_normal(3)
        n /= np.linalg.norm(n)
        d = grid - c
        objects |= (np.abs(d @ n) < 1.5 * size / 64) & (np.linalg.norm(d - (d @ n)[:, None] * n, axis=1) < 0.22 * size)
    label = (tubes & ~objects).reshape((size,) * 3)
    inside = (objects | tubes).reshape((size,) * 3)
    image = 0.6 * _smooth_noise(rng, size, 6) + 0.3 * rng.standard_normal((size,) * 3).astype(np.float32)
    image += inside * (1.5 + 0.4 * _smooth_noise(rng, size, 10))  # same intensity for every object kind
    return image.astype(np.float32), label.astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def write_dataset(root: Path, count: int, size: int, seed: int) -> None:
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image, label = make_volume(rng, size)
        _save(root / "imagesTr" / f"case{i:03d}_0000.nii.gz", image)
        _save(root / "labelsTr" / f"case{i:03d}.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "synthetic"}, "labels":
                                                   {"background": 0, "tube": 1}, "numTraining": count,
                                                   "file_ending": ".nii.gz"}, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--unlabelled", type=int, default=200)
    p.add_argument("--labelled", type=int, default=32)
    p.add_argument("--val", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    (out / "unlabelled").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed + 1000)
    for i in range(a.unlabelled):
        _save(out / "unlabelled" / f"u{i:04d}.nii.gz", make_volume(rng, a.size)[0])
    write_dataset(out / "train", a.labelled, a.size, a.seed)
    write_dataset(out / "val", a.val, a.size, a.seed + 1)
    print(json.dumps({"event": "written", "out": str(out), "size": a.size, "unlabelled": a.unlabelled,
                      "labelled": a.labelled, "val": a.val}))


if __name__ == "__main__":
    main()
