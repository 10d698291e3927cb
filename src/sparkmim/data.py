"""Image data: the built-in demo photographs and the paper's augmentation."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "demo_photo_paths", "pretrain_transform", "DemoPhotos"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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


class DemoPhotos(Dataset):
    """``length`` random augmented crops of the demo photographs (RGB or grayscale)."""

    def __init__(self, size: int | tuple[int, int] = 96, length: int = 512, channels: int = 3, transform=None):
        mode = {1: "L", 3: "RGB"}.get(channels)
        if mode is None:
            raise ValueError(f"the demo photos are RGB or grayscale (channels 3 or 1), got {channels}")
        self.images = [Image.open(p).convert(mode) for p in demo_photo_paths()]
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.25,))
        self.transform = transform or pretrain_transform(size, mean, std)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i % len(self.images)])
