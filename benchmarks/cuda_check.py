"""Correctness of the sparse encoder on a CUDA device (float64), printed as JSON lines.

For each model: P2 dense equivalence (all patches visible, train mode: features and running
statistics), P1 no leakage (masked pixels changed: features identical), masked sites empty,
and the fast implementation against the reference one (features and parameter gradients).
Models named ``monai:...`` or ``torchvision:r3d_18`` (3-D) run on a non-cubic volume.
    python benchmarks/cuda_check.py --models resnet50 convnext_small efficientnet_b0 monai:resnet18

A gradient's difference is taken relative to the largest gradient norm of the model's
parameters when its own norm is below 1e-9 of that: such a gradient (a bias that a following
batch norm cancels) is zero in exact arithmetic, so both forms give rounding noise there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch

from sparkmim import MaskPyramid, SparseEncoder, random_visible


def encoder_and_input(name: str, device: torch.device, size: int):
    """A float64 encoder on ``device`` and a non-square (non-cubic) input for it, with its patch grid."""
    if ":" not in name:
        enc = SparseEncoder.from_timm(name).to(device=device, dtype=torch.float64)
        grid = (size // 32, size // 32 + 1)
        return enc, torch.randn(4, 3, grid[0] * 32, grid[1] * 32, device=device, dtype=torch.float64), grid
    from sparkmim.backbones import create_backbone, feature_modules_for

    chans = 1 if name.startswith("monai:") else 3
    model = create_backbone(name, in_chans=chans)
    enc = SparseEncoder(model, feature_modules_for(name), in_chans=chans).to(device=device, dtype=torch.float64)
    grid = (2, 2, 3)
    x = torch.randn(4, chans, *(g * p for g, p in zip(grid, enc.patch_size)), device=device, dtype=torch.float64)
    return enc, x, grid


def check(name: str, device: torch.device, size: int = 96) -> dict:
    torch.manual_seed(0)
    enc, x, grid = encoder_and_input(name, device, size)
    patch = enc.patch_size
    full = MaskPyramid(torch.ones(4, 1, *grid, dtype=torch.bool, device=device), keep=math.prod(grid))
    a, b = copy.deepcopy(enc).train(), copy.deepcopy(enc).train()
    dense, sparse = a(x), b(x, full)
    p2 = max(float((d - s).abs().max() / d.abs().max()) for d, s in zip(dense, sparse))
    bufs = max((float((u - v).abs().max()) for u, v in zip(a.model.buffers(), b.model.buffers())
                if u.is_floating_point()), default=0.0)
    v = random_visible(4, grid, 0.6, generator=torch.Generator(device=device).manual_seed(1))
    masks = MaskPyramid(v, keep=int(v[0].sum()))
    x2 = torch.where(masks.at(patch), x, 100 * torch.randn_like(x))
    f1 = copy.deepcopy(enc).train()(x, masks)
    f2 = copy.deepcopy(enc).train()(x2, masks)
    leak = all(torch.equal(p, q) for p, q in zip(f1, f2))
    empty = all(bool((f * ~masks.at(tuple(p // a for p, a in zip(enc.patch_size, s)))).abs().sum() == 0) for f, s in zip(f1, enc.strides))
    results = {}
    for impl in ("fast", "reference"):
        e = copy.deepcopy(enc).train()
        with e.using(impl):
            feats = e(x, masks)
        sum((f * f).sum() for f in feats).backward()
        results[impl] = (feats, [q.grad for q in e.parameters() if q.grad is not None])
    (ff, gf), (fr, gr) = results["fast"], results["reference"]
    fast_feat = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ff, fr))
    top = max(float(b.norm()) for b in gr)
    fast_grad = max(float((a - b).norm()) / max(float(b.norm()), 1e-9 * top) for a, b in zip(gf, gr))
    return {"check": "cuda", "model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "p2_max_rel_diff": p2, "p2_max_buffer_diff": bufs, "p1_no_leak": leak, "masked_sites_empty": empty,
            "fast_vs_reference_feature_rel": fast_feat, "fast_vs_reference_grad_rel": fast_grad}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_small", "efficientnet_b0"])
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    for m in args.models:
        print(json.dumps(check(m, device)), flush=True)


if __name__ == "__main__":
    main()
