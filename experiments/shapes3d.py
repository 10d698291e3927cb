"""A held-out 3-D task made here, nothing downloaded: ten classes of solid shapes in noisy volumes.

    python experiments/shapes3d.py data/shapes3d [--size 32] [--pretrain 2000] [--train 1000] [--val 500]
    python experiments/shapes3d.py data/shapes2d --slices-of data/shapes3d   # the 2-D control

writes ``pretrain/`` (unlabelled volumes, flat), ``train/<class>/`` and ``val/<class>/`` (labelled,
the classes balanced) as ``.npy`` arrays ``(D, H, W)`` float32. Every volume draws its shape's
size, centre and orientation, its brightness over the background, a smooth background ramp and
Gaussian noise at random, from a seed of its own (split, index), so the three sets never share a
volume and any one can be made again.

The classes: ball, shell (hollow ball), box, rod (cylinder), torus, cone, ellipsoid (one long
axis), cross (three bars), two balls, slab with a hole (a plate pierced by a round hole).

``--slices-of`` writes the middle axial slice of every volume of a set made before as an 8-bit
PNG (the same tree; 0.5 and 99.5 percentiles of the slice mapped to 0 and 255): the same task
in 2-D."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = ("ball", "shell", "box", "rod", "torus", "cone", "ellipsoid", "cross", "two_balls", "holed_slab")
SPLITS = {"pretrain": 0, "train": 1, "val": 2}


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _mask(kind: str, p: np.ndarray, s: float) -> np.ndarray:
    """The shape ``kind`` of scale ``s`` (voxels) at points ``p`` ``(..., 3)`` in its own frame."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    r = np.sqrt(x**2 + y**2 + z**2)
    if kind == "ball":
        return r < s
    if kind == "shell":
        return (r < s) & (r > 0.6 * s)
    if kind == "box":
        return (np.abs(x) < 0.8 * s) & (np.abs(y) < 0.6 * s) & (np.abs(z) < 0.45 * s)
    if kind == "rod":
        return (np.sqrt(x**2 + y**2) < 0.35 * s) & (np.abs(z) < 1.3 * s)
    if kind == "torus":
        return (np.sqrt(x**2 + y**2) - 0.8 * s) ** 2 + z**2 < (0.32 * s) ** 2
    if kind == "cone":
        h = (z + s) / (2 * s)  # 0 at the base, 1 at the tip
        return (h > 0) & (h < 1) & (np.sqrt(x**2 + y**2) < 0.8 * s * (1 - h))
    if kind == "ellipsoid":
        return (x / (1.4 * s)) ** 2 + (y / (0.5 * s)) ** 2 + (z / (0.5 * s)) ** 2 < 1
    if kind == "cross":
        w = 0.25 * s
        return ((np.abs(x) < 1.2 * s) & (np.abs(y) < w) & (np.abs(z) < w)) | \
               ((np.abs(y) < 1.2 * s) & (np.abs(x) < w) & (np.abs(z) < w)) | \
               ((np.abs(z) < 1.2 * s) & (np.abs(x) < w) & (np.abs(y) < w))
    if kind == "two_balls":
        d = 0.9 * s
        return (np.sqrt((x - d) ** 2 + y**2 + z**2) < 0.55 * s) | (np.sqrt((x + d) ** 2 + y**2 + z**2) < 0.55 * s)
    if kind == "holed_slab":
        return (np.abs(z) < 0.3 * s) & (np.abs(x) < 1.1 * s) & (np.abs(y) < 1.1 * s) & (np.sqrt(x**2 + y**2) > 0.45 * s)
    raise ValueError(kind)


def nuisances(seed: int, size: int = 32) -> dict:
    """What a volume's seed draws besides its class: the shape's scale, centre and orientation,
    its contrast, the background ramp and the noise level (the order of :func:`volume`'s draws)."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.24, 0.34) * size
    centre = size / 2 + rng.uniform(-0.15, 0.15, size=3) * size
    rotation = _rotation(rng)
    contrast = rng.uniform(0.6, 1.4)
    ramp = rng.normal(scale=0.4 / size, size=3)
    sigma = rng.uniform(0.1, 0.3)
    return {"scale": scale, "centre": centre, "rotation": rotation, "contrast": contrast, "ramp": ramp,
            "noise": sigma, "rng": rng}


def volume(label: int, seed: int, size: int = 32) -> np.ndarray:
    """One volume of class ``label``, a function of ``seed`` alone."""
    n = nuisances(seed, size)
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32)] * 3, indexing="ij"), -1)
    points = (grid - n["centre"]) @ n["rotation"].astype(np.float32)  # into the shape's own frame
    inside = _mask(CLASSES[label], points, n["scale"])
    ramp = (grid - size / 2) @ n["ramp"].astype(np.float32)  # a smooth background
    noise = n["rng"].normal(scale=n["noise"], size=inside.shape)
    return (n["contrast"] * inside + ramp + noise).astype(np.float32)


def write(root: Path, size: int, counts: dict[str, int]) -> None:
    for split, count in counts.items():
        for i in range(count):
            label = i % len(CLASSES)
            seed = (SPLITS[split] << 24) + i
            folder = root / split if split == "pretrain" else root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{split}_{i:05d}.npy", volume(label, seed, size))


def middle_slices(source: Path, root: Path) -> int:
    from PIL import Image

    count = 0
    for path in sorted(source.rglob("*.npy")):
        v = np.load(path)
        s = v[v.shape[0] // 2]
        lo, hi = np.percentile(s, 0.5), np.percentile(s, 99.5)
        out = root / path.relative_to(source).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip((s - lo) / (hi - lo + 1e-6), 0, 1) * 255).astype(np.uint8)).save(out)
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--pretrain", type=int, default=2000)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--slices-of", type=Path, help="a set made before: write its middle slices instead")
    args = parser.parse_args()
    if args.slices_of:
        print(f"{middle_slices(args.slices_of, args.root)} slices written under {args.root}")
        return
    write(args.root, args.size, {"pretrain": args.pretrain, "train": args.train, "val": args.val})


if __name__ == "__main__":
    main()
