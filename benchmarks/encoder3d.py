"""Time a 3-D sparse encoder's forward + backward in both sparse forms and the dense model; JSON lines.

    python benchmarks/encoder3d.py --model monai:resnet18 --size 96 --batch 2
    python benchmarks/encoder3d.py --device cuda --size 128 --batch 8

Variants, run alternately (one round of each, then the next), median over rounds:

* ``dense``: the plain 3-D backbone on the whole volume (its feature maps, summed);
* ``reference``: the sparse encoder in the reference form (every layer dense, then masked);
* ``fast``: the sparse encoder in the fast form (visible tiles only, halos across patch borders).

Each line gives the median and minimum milliseconds and the ratios to ``dense`` and to
``reference``. Mask ratio 0.6, float32 (``--precision bf16``: under autocast), training mode, CPU threads as torch chooses (``--threads``).
``--channels-last`` puts the model and the volumes in ``torch.channels_last_3d`` (what
``--channels-last true`` does for a 3-D run; ``auto`` leaves volumes contiguous).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="monai:resnet18")
    p.add_argument("--size", type=int, default=96, help="cube side in voxels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true", help="model and volumes in channels_last_3d")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: every variant under torch.autocast (as a bf16 run computes)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sparkmim import SparseEncoder
    from sparkmim.backbones import create_backbone, feature_modules_for

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_backbone(args.model, in_chans=args.in_chans)
    enc = SparseEncoder(model, feature_modules_for(args.model), in_chans=args.in_chans).train().to(device)
    x = torch.randn(args.batch, args.in_chans, args.size, args.size, args.size).to(device)
    if args.channels_last:
        enc, x = enc.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    grid = tuple(args.size // s for s in enc.patch_size)
    from sparkmim.masking import MaskPyramid, num_visible, random_visible

    keep = num_visible(grid[0] * grid[1] * grid[2], 0.6)
    visible = random_visible(args.batch, grid, 0.6, generator=torch.Generator().manual_seed(0))
    masks = MaskPyramid(visible.to(device), keep)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def dense():
        with autocast():
            feats = enc(x)
        sum(f.float().sum() for f in feats).backward()

    def sparse(impl):
        def run():
            with enc.using(impl), autocast():
                feats = enc(x, masks)
            sum(f.float().sum() for f in feats).backward()
        return run

    variants = {"dense": dense, "reference": sparse("reference"), "fast": sparse("fast")}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        for name, fn in variants.items():
            enc.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if r >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    base, ref = statistics.median(times["dense"]), statistics.median(times["reference"])
    for name, ms in times.items():
        print(json.dumps({"bench": "encoder3d", "variant": name, "model": args.model, "size": args.size,
                          "batch": args.batch, "patch": list(enc.patch_size), "grid": list(grid), "visible": keep,
                          "channels_last_3d": args.channels_last, "precision": args.precision,
                          "device": device.type,
                          "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "threads": torch.get_num_threads(),
                          "rounds": args.rounds, "ms_median": round(statistics.median(ms), 1),
                          "ms_min": round(min(ms), 1), "vs_dense": round(statistics.median(ms) / base, 3),
                          "vs_reference": round(statistics.median(ms) / ref, 3)}), flush=True)


if __name__ == "__main__":
    main()
