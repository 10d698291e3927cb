"""The captured training step (one CUDA graph) against the eager step on a CUDA device; JSON lines.

Two copies of one seeded SparK model take the same 6 steps (same images and masks, lr schedule
written in place): one with ``train_step``, one with ``CapturedStep`` (2 eager steps, then
recorded and replayed). With deterministic cuDNN the weights should agree to the last bit;
the line reports the largest parameter difference and the steps' losses.

    python benchmarks/cuda_capture_check.py --models resnet18 convnext_atto
"""

from __future__ import annotations

import argparse
import json

import torch


def check(name: str, device: torch.device, precision: str) -> dict:
    from sparkmim import SparK, SparseEncoder
    from sparkmim.config import load_config
    from sparkmim.optim import Schedule
    from sparkmim.train import apply_schedule, build_optimizer, train_step
    from sparkmim.train.capture import CapturedStep

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    dtype = torch.bfloat16 if precision == "bf16" else None
    autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else None
    cfg = load_config(None, {"model": name})
    sched = Schedule(1e-3, 6, 2)
    runs = []
    for captured in (False, True):
        torch.manual_seed(0)
        model = SparK(SparseEncoder.from_timm(name), decoder_width=64).to(device).train()
        model = model.to(memory_format=torch.channels_last)
        opt = build_optimizer(model, cfg, 1e-3)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        kw = {"autocast": autocast} if autocast else {}
        step = CapturedStep(model, opt, scaler, warmup_steps=2, **kw) if captured else None
        losses = []
        for i in range(6):
            apply_schedule(opt, sched, i)
            g = torch.Generator(device=device).manual_seed(100 + i)
            x = torch.randn(8, 3, 96, 128, device=device, generator=g).contiguous(memory_format=torch.channels_last)
            batch = [(x, model.draw_masks(x, g))]
            out = step(batch) if captured else train_step(model, opt, scaler, batch, **kw)
            losses.append(float(out.loss_sum))
        runs.append((model, losses, step))
    (eager, eager_losses, _), (cap, cap_losses, step) = runs
    diff = max(float((a - b).abs().max()) for a, b in zip(eager.parameters(), cap.parameters()))
    return {"bench": "capture_check", "model": name, "precision": precision, "graph": step.graph is not None,
            "max_param_diff": diff, "losses_eager": eager_losses, "losses_captured": cap_losses,
            "card": torch.cuda.get_device_name(device)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "convnext_atto"])
    args = p.parse_args()
    device = torch.device("cuda")
    for name in args.models:
        for precision in ("fp32", "bf16"):
            try:
                print(json.dumps(check(name, device, precision)), flush=True)
            except Exception as e:  # report and go on: the timing matrix still runs
                print(json.dumps({"bench": "capture_check", "model": name, "precision": precision,
                                  "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)


if __name__ == "__main__":
    main()
