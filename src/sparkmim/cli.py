"""Command-line interface: ``sparkmim demo`` (the pre-training CLI grows here)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch
    from timm.optim import Lamb

    from .data import IMAGENET_MEAN, IMAGENET_STD, DemoPhotos
    from .encoder import SparseEncoder
    from .model import SparK
    from .visualize import save_reconstruction_grid

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = DemoPhotos(size=args.size, length=args.steps * args.batch_size)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                                         drop_last=True, generator=torch.Generator().manual_seed(args.seed))
    model = SparK(SparseEncoder.from_timm(args.model), decoder_width=args.decoder_width, mask_ratio=args.mask_ratio)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "mask_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "mask_token" in n]
    opt = Lamb([{"params": decay, "weight_decay": 0.04}, {"params": no_decay, "weight_decay": 0.0}],
               lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 10)
    print(json.dumps({"event": "start", "model": args.model, "params_m": round(n_params / 1e6, 2),
                      "images": len(data.images), "size": args.size, "batch": args.batch_size,
                      "steps": args.steps, "strides": model.encoder.strides}), flush=True)
    fixed = torch.stack([data[i] for i in range(min(8, len(data)))])
    fixed_mask = torch.Generator().manual_seed(1)
    model.eval()
    save_reconstruction_grid(model.reconstruct(fixed, generator=fixed_mask), out_dir / "reconstruction_start.png",
                             IMAGENET_MEAN, IMAGENET_STD)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step, images in enumerate(loader):
        lr = args.lr * (step + 1) / warmup if step < warmup else \
            args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(images)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(out.loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t0
            print(json.dumps({"step": step, "loss": round(losses[-1], 4), "lr": float(f"{lr:.3g}"),
                              "img_per_s": round((step + 1) * args.batch_size / elapsed, 1)}), flush=True)
    model.eval()
    fixed_mask = torch.Generator().manual_seed(1)
    png = save_reconstruction_grid(model.reconstruct(fixed, generator=fixed_mask), out_dir / "reconstruction_end.png",
                                   IMAGENET_MEAN, IMAGENET_STD)
    k = max(1, len(losses) // 10)
    summary = {"event": "done", "steps": len(losses), "loss_first": round(sum(losses[:k]) / k, 4),
               "loss_last": round(sum(losses[-k:]) / k, 4), "seconds": round(time.perf_counter() - t0, 1),
               "reconstructions": str(png)}
    print(json.dumps(summary), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sparkmim", description="SparK masked image modeling for any convnet.")
    parser.add_argument("--version", action="version", version=f"sparkmim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="pre-train briefly on the built-in demo photos and print the loss",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--model", default="resnet18", help="timm model name")
    demo.add_argument("--size", type=int, default=96, help="crop size (multiple of the total stride)")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (LAMB)")
    demo.add_argument("--decoder-width", type=int, default=384)
    demo.add_argument("--mask-ratio", type=float, default=0.6)
    demo.add_argument("--workers", type=int, default=0)
    demo.add_argument("--log-every", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="folder for the reconstruction PNGs")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
