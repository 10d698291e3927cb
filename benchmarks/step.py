"""Time one full SparK training step (forward, backward, LAMB step) and print one JSON line.

    python benchmarks/step.py --model resnet50 --batch 8 --size 224 --device cpu
    python benchmarks/step.py --model convnext_small --batch 128 --device cuda --precision bf16

Reports the median milliseconds per step over --steps timed steps (after --warmup untimed
ones), images per second from that median, and peak memory: on CUDA the allocator's peak;
on CPU the process's peak resident set size (it includes the Python process and libraries).
``--part encoder`` times the sparse encoder's forward+backward alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time

import torch


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="timm model name")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--decoder-width", type=int, default=768)
    p.add_argument("--part", choices=["step", "encoder"], default="step")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    from timm.optim import Lamb

    from sparkmim import SparK, SparseEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SparK(SparseEncoder.from_timm(args.model), mask_ratio=args.mask_ratio,
                  decoder_width=args.decoder_width).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = Lamb(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.04)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    images = torch.randn(args.batch, model.in_chans, args.size, args.size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    gen = torch.Generator(device=device).manual_seed(0)
    run = torch.compile(model) if args.compile else model

    def step():
        if args.part == "encoder":
            masks = model.random_masks(images, gen)
            with autocast:
                feats = model.encoder(images, masks)
                loss = sum(f.float().mean() for f in feats)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return
        with autocast:
            out = run(images, generator=gen)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(opt)
        scaler.update()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    ms = statistics.median(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        card = torch.cuda.get_device_name(device)
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        card = platform.processor() or platform.machine()
    result = {
        "bench": "step", "part": args.part, "model": args.model, "batch": args.batch, "size": args.size,
        "device": device.type, "card": card, "threads": torch.get_num_threads(), "precision": args.precision,
        "channels_last": args.channels_last, "compile": args.compile, "mask_ratio": args.mask_ratio,
        "decoder_width": args.decoder_width, "ms_per_step_median": round(ms, 1),
        "ms_min": round(min(times), 1), "img_per_s": round(args.batch * 1000 / ms, 1),
        "peak_mem_mb": round(peak_mb, 1), "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "cpu_rss",
        "torch": torch.__version__, "steps": args.steps,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
