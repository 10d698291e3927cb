"""Time SparK training steps for several implementations and levers side by side; JSON lines.

    python benchmarks/step.py --model resnet50 --batch 8 --size 224 --device cpu \\
        --variants reference,fast --parts step,encoder
    python benchmarks/step.py --model convnext_small --batch 128 --device cuda \\
        --variants reference+bf16,fast+bf16,fast+bf16+cl,fast+bf16+cl+compile

A variant is an implementation of the sparse encoder (``reference``: dense then mask;
``fast``: visible sites only) followed by levers joined with ``+``:

    bf16 / fp16  autocast (fp16 with gradient scaling)
    cl           channels_last memory format for the model and the images
    compile      torch.compile of the dense decoder (the sparse encoder runs eagerly)
    capture      the engine's whole step recorded once as a CUDA graph and replayed
                 (sparkmim.train.capture.CapturedStep; part step only; needs >= 3 warm-up rounds)
    dwcanvasN    depthwise layers on tiles smaller than N x N on the zero canvas instead of the
                 halo (sparkmim.sparse.fast.CANVAS_DEPTHWISE_BELOW; ``dwcanvas`` alone: 4;
                 ``dwcanvas0``: the halo everywhere)

Every variant gets its own copy of one seeded model (same weights) and optimiser. Timed steps
alternate between the variants (one step of each, then the next round), so slow drifts of the
machine hit every variant alike; the median over rounds is reported.

Parts: ``step`` = forward, backward, gradient clipping and LAMB step of the whole model;
``encoder`` = the sparse encoder's forward and backward alone; ``decoder`` = densify, decoder
and loss forward and backward on fixed encoder features.

Peak memory: on CUDA the allocator's peak during the variant's step, less what the other
variants hold, plus this variant's own parameters and optimiser state (what a process running
this variant alone would peak at). On CPU (Linux) each variant runs once more, alone, in a child
process, which reports its peak resident set size during the steps (``peak_rss_mb``, the whole
process, model and optimiser included) and that peak less the resident size just before the
steps (``step_rss_mb``: activations and other per-step memory).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

from opcount import Count  # benchmarks/opcount.py

LEVERS = ("bf16", "fp16", "cl", "compile", "capture", "dwcanvas")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="timm model name")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default="reference,fast", help="comma-separated IMPL[+LEVER...]; levers: "
                   + ", ".join(LEVERS))
    p.add_argument("--parts", default="step", help="comma-separated: step, encoder, decoder")
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--decoder-width", type=int, default=768)
    p.add_argument("--steps", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--memory", choices=["auto", "on", "off"], default="auto",
                   help="CPU: measure each variant's peak RSS in a child process (auto: on for CPU)")
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Variant:
    def __init__(self, spec: str):
        parts = spec.split("+")
        self.spec, self.impl, self.levers = spec, parts[0], set(parts[1:])
        if self.impl not in ("reference", "fast"):
            raise SystemExit(f"unknown implementation {self.impl!r} in variant {spec!r}")
        self.canvas_below = None
        for lever in sorted(self.levers):
            if lever.startswith("dwcanvas"):
                self.canvas_below = int(lever[len("dwcanvas"):] or 4)
                self.levers = (self.levers - {lever}) | {"dwcanvas"}
        bad = self.levers - set(LEVERS)
        if bad:
            raise SystemExit(f"unknown levers {sorted(bad)} in variant {spec!r}; known: {', '.join(LEVERS)}")
        self.dtype = torch.bfloat16 if "bf16" in self.levers else torch.float16 if "fp16" in self.levers else None


def build(args, variant: Variant, base, device):
    from sparkmim.optim import hold_on_device, lamb, param_groups

    model = copy.deepcopy(base).to(device).train()
    if "cl" in variant.levers:
        model = model.to(memory_format=torch.channels_last)
    if "compile" in variant.levers:
        model.decoder.compile()
    opt = lamb(param_groups(model), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.04)
    hold_on_device(opt)  # as the engine's optimiser: lr and weight decay on the device
    scaler = torch.amp.GradScaler(device.type, enabled="fp16" in variant.levers)
    return model, opt, scaler


def make_step(args, variant: Variant, model, opt, scaler, images, part, device):
    from sparkmim.train import train_step
    from sparkmim.train.capture import CapturedStep

    autocast = (lambda: torch.autocast(device.type, dtype=variant.dtype)) if variant.dtype else contextlib.nullcontext
    captured = CapturedStep(model, opt, scaler, clip_grad=5.0, autocast=autocast, warmup_steps=2) \
        if "capture" in variant.levers and part == "step" else None
    gen = torch.Generator(device=device).manual_seed(0)
    x = images.contiguous(memory_format=torch.channels_last) if "cl" in variant.levers else images
    fixed = {}

    def step():
        with model.encoder.using(variant.impl):  # the variant's sparse form, for every part of the step
            one_step()

    def one_step():
        masks = model.draw_masks(x, gen)
        if part == "encoder":
            with autocast():
                feats = model.forward_encoder(x, masks)
                loss = sum(f.float().square().mean() for f in feats)
            loss.backward()
        elif part == "decoder":
            if "feats" not in fixed:
                with torch.no_grad(), autocast():
                    fixed["masks"] = masks
                    fixed["feats"] = [f.detach() for f in model.forward_encoder(x, masks)]
            masks = fixed["masks"]
            with autocast():
                pred = model.forward_decoder(model.forward_densify(fixed["feats"], masks))
                loss = model.forward_loss(x, pred, masks.visible)
            loss.backward()
        elif captured is not None:  # the same step, recorded once and replayed
            captured([(x, masks)])
        else:  # the run loop's own step: forward, backward, the one clip, LAMB
            train_step(model, opt, scaler, [(x, masks)], clip_grad=5.0, autocast=autocast)
        opt.zero_grad(set_to_none=True)

    if "dwcanvas" not in variant.levers:
        return step

    def step_with_canvas_depthwise():
        from sparkmim.sparse import fast

        before = fast.CANVAS_DEPTHWISE_BELOW.get(device.type)
        fast.CANVAS_DEPTHWISE_BELOW[device.type] = variant.canvas_below
        try:
            step()
        finally:
            if before is None:
                del fast.CANVAS_DEPTHWISE_BELOW[device.type]
            else:
                fast.CANVAS_DEPTHWISE_BELOW[device.type] = before

    return step_with_canvas_depthwise


def state_bytes(model, opt) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    for s in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in s.values() if isinstance(v, torch.Tensor))
    return n


def child_rss(argv, spec: str, part: str) -> dict:
    """Peak RSS of a child process that runs one variant alone."""
    cmd = [sys.executable, __file__, *argv, "--variants", spec, "--parts", part, "--steps", "1", "--warmup", "1",
           "--memory", "off", "--rss-child"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"memory child failed: {out.stderr[-2000:]}")


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    from sparkmim import SparK, SparseEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = SparK(SparseEncoder.from_timm(args.model), mask_ratio=args.mask_ratio, decoder_width=args.decoder_width)
    variants = [Variant(s) for s in args.variants.split(",") if s]
    parts = [p for p in args.parts.split(",") if p]
    images = torch.randn(args.batch, base.in_chans, args.size, args.size,
                         generator=torch.Generator().manual_seed(1)).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = []
    for part in parts:
        runs = []
        for v in variants:
            model, opt, scaler = build(args, v, base, device)
            runs.append((v, model, opt, make_step(args, v, model, opt, scaler, images, part, device), []))
        if args.rss_child:
            rss0 = _reset_peak_rss()
        for _ in range(args.warmup):
            for run in runs:
                run[3]()
        sync()
        ops = {}
        for v, _model, _opt, step, _times in runs:  # aten operations one step dispatches (device-independent)
            counter = Count()
            with counter:
                step()
            ops[v.spec] = counter.total
        sync()
        peaks = {}
        for _ in range(args.steps):
            for v, model, opt, step, times in runs:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                t = time.perf_counter()
                step()
                sync()
                times.append((time.perf_counter() - t) * 1000)
                if device.type == "cuda":
                    rise = torch.cuda.max_memory_allocated(device) - before
                    peaks[v.spec] = max(peaks.get(v.spec, 0), rise + state_bytes(model, opt))
        for v, _model, _opt, _step, times in runs:
            ms = statistics.median(times)
            r = {
                "bench": "step", "part": part, "variant": v.spec, "impl": v.impl, "levers": sorted(v.levers),
                "model": args.model, "batch": args.batch, "size": args.size, "device": device.type,
                "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "mask_ratio": args.mask_ratio, "decoder_width": args.decoder_width, "steps": args.steps,
                "ms_median": round(ms, 1), "ms_min": round(min(times), 1), "aten_ops": ops[v.spec],
                "img_per_s": round(args.batch * 1000 / ms, 1),
            }
            if device.type == "cuda":
                r["peak_mem_mb"] = round(peaks[v.spec] / 2**20, 1)
            if args.rss_child:
                peak = _proc_status_kb("VmHWM")
                r["peak_rss_mb"], r["step_rss_mb"] = round(peak / 1024, 1), round((peak - rss0) / 1024, 1)
            results.append(r)
        del runs
    if device.type == "cpu" and (args.memory == "on" or (args.memory == "auto" and not args.rss_child)):
        strip = _drop_values(argv, ("--variants", "--parts", "--steps", "--warmup", "--memory"))
        for r in results:
            child = child_rss(strip, r["variant"], r["part"])
            r["peak_rss_mb"], r["step_rss_mb"] = child["peak_rss_mb"], child["step_rss_mb"]
    for r in results:
        print(json.dumps(r), flush=True)
    return results


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux) and return the current RSS in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kb("VmRSS")


def _drop_values(argv: list[str], names: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
