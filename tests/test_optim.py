"""Optimisation: one gradient clip, LAMB as in the reference recipe, schedules, parameter groups."""

import math

import pytest
import torch
from torch import nn

from sparkmim.config import load_config
from sparkmim.optim import Schedule, clip_grad_norm_, param_groups
from sparkmim.train import build_optimizer, optimizer_step

NORMS = [3.0, 0.4, 2.0, 8.0, 0.7, 1.5]  # global gradient norms: some above the clip (5), some between 1 and 5


class Params(nn.Module):
    """Parameters of every kind LAMB treats differently: decayed weights (trust ratio), biases and
    norm weights (1-D, no decay, no trust ratio), and a 4-D mask token (no decay by name)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Parameter(torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) * 0.1)
        self.linear = nn.Parameter(torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.2)
        self.bias = nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64) * 0.01)
        self.norm = nn.Parameter(torch.ones(7, dtype=torch.float64))
        self.mask_token = nn.Parameter(torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64) * 0.02)


def fixed_gradients(model, steps):
    """Per step, gradients of random direction scaled to the global norm ``NORMS[step]``."""
    g = torch.Generator().manual_seed(1)
    out = []
    for norm in NORMS[:steps]:
        raw = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
        total = math.sqrt(sum(float(v.square().sum()) for v in raw.values()))
        out.append({n: v * (norm / total) for n, v in raw.items()})
    return out


def written_out_lamb(init, grads, lrs, wds, betas, clip, eps=1e-6):
    """LAMB with one global-norm clip, written from the algorithm: clip, Adam moments with bias
    correction, decoupled-in-update weight decay, layer-wise trust ratio ||w|| / ||u|| for the
    decayed parameters only."""
    b1, b2 = betas
    p = {n: v.clone() for n, v in init.items()}
    m = {n: torch.zeros_like(v) for n, v in p.items()}
    v2 = {n: torch.zeros_like(v) for n, v in p.items()}
    no_decay = {n for n, v in p.items() if v.ndim <= 1 or n.endswith("mask_token")}
    for t, (g, lr, wd) in enumerate(zip(grads, lrs, wds), start=1):
        total = math.sqrt(sum(float(x.square().sum()) for x in g.values()))
        scale = max(1.0, total / clip)
        for n in p:
            gc = g[n] / scale
            m[n] = b1 * m[n] + (1 - b1) * gc
            v2[n] = b2 * v2[n] + (1 - b2) * gc * gc
            u = (m[n] / (1 - b1**t)) / ((v2[n] / (1 - b2**t)).sqrt() + eps)
            if n not in no_decay:
                u = u + wd * p[n]
                w_norm, u_norm = float(p[n].norm()), float(u.norm())
                u = u * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            p[n] = p[n] - lr * u
    return p


def reference_schedule(peak, total, warmup, wd, wd_end):
    """lr and weight decay per step as in the reference recipe: warm-up from 0.5 % of the peak,
    cosines that reach 0.1 % of the peak and the final decay at the last step, total - 1."""
    lrs, wds = [], []
    for it in range(total):
        if it < warmup:
            lrs.append(0.005 * peak + 0.995 * peak * it / warmup)
        else:
            lrs.append(0.001 * peak + 0.999 * peak * (0.5 + 0.5 * math.cos(math.pi * (it - warmup) / (total - 1 - warmup))))
        wds.append(wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * it / (total - 1))))
    return lrs, wds


def engine_trajectory(model, grads, cfg, peak, total, warmup):
    """The engine's optimiser set-up and step (schedule written into the groups as the run loop does)."""
    opt = build_optimizer(model, cfg, peak)
    sched = Schedule(peak, total, warmup, wd=cfg.weight_decay, wd_end=cfg.weight_decay_end)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    norms = []
    for step, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
            if group.get("decay"):
                group["weight_decay"] = sched.weight_decay(step)
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        norms.append(float(optimizer_step(model, opt, scaler, cfg.clip_grad)))
        assert all(p.grad is None for p in model.parameters())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def test_lamb_with_one_clip_follows_the_reference_trajectory():
    """Six float64 steps with fixed gradients of global norms 3, 0.4, 2, 8, 0.7, 1.5: the engine's
    LAMB (clip 5, decay and no-decay groups, schedules) equals LAMB written out with one clip at 5."""
    model = Params()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = fixed_gradients(model, len(NORMS))
    cfg = load_config(None, {"betas": "0.9,0.95", "clip_grad": 5.0, "weight_decay": 0.04, "weight_decay_end": 0.2})
    peak, total, warmup = 0.05, len(NORMS), 2
    got, norms = engine_trajectory(model, grads, cfg, peak, total, warmup)
    assert norms == pytest.approx(NORMS, rel=1e-12)  # the logged norm is the one before clipping
    lrs, wds = reference_schedule(peak, total, warmup, 0.04, 0.2)
    assert lrs[-1] == pytest.approx(0.001 * peak) and wds[-1] == pytest.approx(0.2)
    expected = written_out_lamb(init, grads, lrs, wds, (0.9, 0.95), clip=5.0)
    for n in expected:
        assert (got[n] - init[n]).abs().max() > 1e-4, f"{n} did not move"
        torch.testing.assert_close(got[n], expected[n], rtol=1e-12, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    # the comparison is sharp: a second clip (timm's Lamb clips at 1.0 by default) breaks it
    twice = written_out_lamb(init, [{n: v / max(1.0, NORMS[i] / 5.0) for n, v in g.items()} for i, g in enumerate(grads)],
                             lrs, wds, (0.9, 0.95), clip=1.0)
    assert max(float((twice[n] - expected[n]).abs().max()) for n in expected) > 1e-4


def test_clip_zero_disables_clipping_but_still_reports_the_norm():
    model = Params()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = fixed_gradients(model, 4)
    cfg = load_config(None, {"betas": "0.9,0.999", "clip_grad": 0.0})
    got, norms = engine_trajectory(model, grads, cfg, 0.01, 4, 1)
    assert norms == pytest.approx(NORMS[:4], rel=1e-12)
    lrs, wds = reference_schedule(0.01, 4, 1, cfg.weight_decay, cfg.weight_decay_end)
    expected = written_out_lamb(init, grads, lrs, wds, (0.9, 0.999), clip=math.inf)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-12, atol=1e-12)


def test_clip_grad_norm_divides_like_the_reference_lamb():
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = torch.tensor([6.0, 8.0, 0.0], dtype=torch.float64)  # norm 10
    norm = clip_grad_norm_([p], 5.0)
    assert float(norm) == 10.0 and torch.equal(p.grad, torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64))
    p.grad = torch.tensor([0.3, 0.4, 0.0], dtype=torch.float64)  # below the clip: untouched
    assert float(clip_grad_norm_([p], 5.0)) == pytest.approx(0.5)
    assert torch.equal(p.grad, torch.tensor([0.3, 0.4, 0.0], dtype=torch.float64))


def test_schedule_matches_the_reference_recipe():
    s = Schedule(peak_lr=1.0, total_steps=1601, warmup_steps=40)
    assert s.lr(0) == pytest.approx(0.005) and s.lr(40) == pytest.approx(1.0)
    assert s.lr(20) == pytest.approx(0.005 + 0.995 * 0.5)
    assert s.lr(820) == pytest.approx(0.001 + 0.999 * 0.5)
    assert s.lr(1600) == pytest.approx(0.001)  # the last step has the final value
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(1600) == pytest.approx(0.2)
    assert s.weight_decay(800) == pytest.approx(0.12)
    lrs, wds = reference_schedule(1.0, 1601, 40, 0.04, 0.2)
    assert [s.lr(i) for i in range(1601)] == pytest.approx(lrs, rel=1e-12)
    assert [s.weight_decay(i) for i in range(1601)] == pytest.approx(wds, rel=1e-12)


@pytest.mark.parametrize("on_device", [False, True])
def test_every_step_writes_the_schedules_lr_and_weight_decay_into_the_groups(on_device):
    """What the run does before each step: the step's lr into every group, the step's weight
    decay into the decayed group only (0.04 -> 0.2 on a cosine over 11 steps: 0.12 at step 5,
    by hand), as floats or into the tensors held on the device."""
    from sparkmim.optim import hold_on_device, lamb
    from sparkmim.train import apply_schedule

    opt = lamb(param_groups(Params()), lr=1.0, weight_decay=0.04)
    if on_device:
        hold_on_device(opt)
    schedule = Schedule(peak_lr=2.0, total_steps=11, warmup_steps=2, wd=0.04, wd_end=0.2)
    for step, lr, wd in ((0, 0.01, 0.04), (1, 1.005, 0.04 + 0.16 * (1 - math.cos(math.pi / 10)) / 2),
                         (5, 0.002 + 1.998 * 0.5 * (1 + math.cos(math.pi * 3 / 8)), 0.12), (10, 0.002, 0.2)):
        apply_schedule(opt, schedule, step)
        decay, no_decay = opt.param_groups
        assert float(decay["lr"]) == float(no_decay["lr"]) == pytest.approx(lr), step
        assert (float(decay["weight_decay"]), float(no_decay["weight_decay"])) == (pytest.approx(wd), 0.0), step


def test_no_weight_decay_on_biases_norms_and_mask_tokens():
    from sparkmim import SparK, SparseEncoder

    model = SparK(SparseEncoder.from_timm("resnet10t"), decoder_width=32)
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("mask_token") for n in nd) and any(n.endswith(".bias") for n in nd)
    assert "encoder.model.bn1.weight" in nd and no_decay["weight_decay"] == 0.0


def _timm_lamb_trajectory(init, grads, lrs, wds, betas):
    """The same steps through timm's ``Lamb`` (no clip of its own), floats written per step."""
    from timm.optim import Lamb as TimmLamb

    model = Params()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(init[n])
    opt = TimmLamb(param_groups(model), lr=lrs[0], betas=betas, weight_decay=wds[0], max_grad_norm=None)
    for g, lr, wd in zip(grads, lrs, wds):
        for group in opt.param_groups:
            group["lr"] = lr
            if group["decay"]:
                group["weight_decay"] = wd
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("on_device", [True, False])
def test_lamb_equals_timms_lamb_with_tensor_or_float_hyper_parameters(on_device):
    """sparkmim's all-tensors-at-once LAMB follows timm's per-tensor LAMB (float64, six steps, decay
    and no-decay groups), with lr and weight decay held as tensors (pre-training) or written as
    floats (fine-tuning); a weight decay that reaches 0 turns the trust ratio off as in timm."""
    from sparkmim.optim import hold_on_device, lamb, set_hyper

    init = {n: p.detach().clone() for n, p in Params().named_parameters()}
    grads = fixed_gradients(Params(), len(NORMS))
    lrs = [0.01, 0.03, 0.05, 0.04, 0.02, 0.01]
    wds = [0.04, 0.1, 0.0, 0.2, 0.0, 0.05]  # zeros: no trust ratio at those steps
    expected = _timm_lamb_trajectory(init, grads, lrs, wds, (0.9, 0.95))
    model = Params()
    opt = lamb(param_groups(model), lr=lrs[0], betas=(0.9, 0.95), weight_decay=wds[0])
    if on_device:
        hold_on_device(opt)
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[1]["weight_decay"] == 0.0
    for g, lr, wd in zip(grads, lrs, wds):
        for group in opt.param_groups:
            set_hyper(group, "lr", lr)
            if group["decay"]:
                set_hyper(group, "weight_decay", wd)
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()
    for n, p in model.named_parameters():
        assert (p - init[n]).abs().max() > 1e-4
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-13, msg=lambda m, n=n: f"{n}: {m}")
    assert float(opt.param_groups[0]["step"]) == len(NORMS)


def test_optimizer_step_reads_no_host_value_and_costs_a_handful_of_operations():
    """The engine's optimiser step (clip + LAMB over both groups) dispatches a fixed, small number of
    operations whatever the number of tensors, none of which reads a value on the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparkmim import SparK, SparseEncoder

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    counts = []
    for name in ("resnet10t", "resnet18"):
        model = SparK(SparseEncoder.from_timm(name), decoder_width=32)
        cfg = load_config(None, {"model": name})
        opt = build_optimizer(model, cfg, 1e-3)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for _ in range(2):  # the first step creates the state
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            rec = Record()
            with rec:
                optimizer_step(model, opt, scaler, 5.0)
        assert not {"_local_scalar_dense", "item", "nonzero"} & set(rec.ops)
        assert len(list(model.parameters())) > 60
        counts.append(len(rec.ops))
    assert counts[0] == counts[1] <= 60, counts  # independent of the number of tensors
