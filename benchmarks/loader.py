"""Input-pipeline throughput: decode + augment images per second, per worker; JSON lines.

    python benchmarks/loader.py --data demo --size 224 --seconds 10
    python benchmarks/loader.py --data /path/to/jpegs --workers 0,4,8 --batch 128

Methods compared on the same files, one process (``--workers`` adds whole-DataLoader runs of
sparkmim's own data set, with persistent workers and pinned memory where asked):

    pil          Pillow full decode (sparkmim.data.load_image), then sparkmim's transform
                 (random resized crop, bicubic resize, flip, normalise)
    tv-decode    torchvision.io.decode_jpeg on CPU (libjpeg-turbo), other formats as pil
    fast         sparkmim.data.read_image, what pre-training uses (--fast-decode, default on):
                 JPEG draft mode (libjpeg decodes at 1/2, 1/4 or 1/8 scale) when even the
                 smallest crop keeps at least the output size, else tv-decode

The per-worker figure is what one data-loading process sustains; a training step of
``ms`` milliseconds on ``batch`` images needs ``batch / ms * 1000 / per_worker`` workers to keep up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo", help="image folder, or 'demo' for the bundled photographs")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=8.0, help="time per method")
    p.add_argument("--methods", default="pil,tv-decode,fast")
    p.add_argument("--workers", default="", help="comma-separated worker counts for DataLoader runs (e.g. 0,2)")
    p.add_argument("--batch", type=int, default=64, help="batch size of the DataLoader runs")
    p.add_argument("--pin-memory", action="store_true")
    return p.parse_args(argv)


def _tv_open(path: Path):
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    if path.suffix.lower() in (".jpg", ".jpeg"):
        return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    with Image.open(path) as im:
        return im.convert("RGB")


def main(argv=None) -> list[dict]:
    args = parse(argv)
    from sparkmim.data import (
        EpochSampler,
        ImageFiles,
        demo_photo_paths,
        list_images,
        load_image,
        pretrain_transform,
        read_image,
    )

    paths = demo_photo_paths() if args.data == "demo" else list_images(args.data)
    transform = pretrain_transform(args.size)
    openers = {
        "pil": lambda p: load_image(p, 3),
        "tv-decode": _tv_open,
        "fast": lambda p: read_image(p, 3, args.size, 0.67),
    }
    torch.set_num_threads(1)  # what a DataLoader worker gets
    results = []
    for name in [m for m in args.methods.split(",") if m]:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            img = openers[name](paths[n % len(paths)])
            transform(img)
            n += 1
        dt = time.perf_counter() - t0
        r = {"bench": "loader", "method": name, "images": n, "img_per_s_per_worker": round(n / dt, 1),
             "size": args.size, "files": len(paths), "data": args.data,
             "mean_megapixels": round(sum(Image.open(p).size[0] * Image.open(p).size[1] for p in paths)
                                      / len(paths) / 1e6, 3)}
        results.append(r)
        print(json.dumps(r), flush=True)
    for w in [int(v) for v in args.workers.split(",") if v]:
        data = ImageFiles(paths * max(1, 2048 // len(paths)), transform, fast_decode=(args.size, 0.67))
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch, sampler=EpochSampler(len(data), args.batch),
                                             num_workers=w, collate_fn=data.collate, pin_memory=args.pin_memory,
                                             persistent_workers=w > 0, drop_last=True)
        it = iter(loader)
        next(it)  # start-up
        n, t0 = 0, time.perf_counter()
        for batch in it:
            n += batch[0].shape[0]
            if time.perf_counter() - t0 > args.seconds:
                break
        dt = time.perf_counter() - t0
        r = {"bench": "loader", "method": "dataloader", "workers": w, "batch": args.batch,
             "pin_memory": args.pin_memory, "img_per_s": round(n / dt, 1)}
        results.append(r)
        print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    main()
