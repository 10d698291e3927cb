"""The fast form's tensor algebra on tiles (sparkmim.sparse.algebra), one translation at a time.

Each case is a tiny module applied to a feature map inside a small BN network. It runs through
``SparseEncoder`` in both forms (float64, training mode), and:

* the fast form really ran: the module received and returned ``SparseMap``s (and the build-time
  check did not fall back to the reference form);
* in both forms the module's output at visible sites is the dense computation on the dense input,
  masked;
* the fast form's features, gradients and running statistics equal the reference form's.
"""

import copy

import pytest
import torch
from torch import nn

from sparkmim import MaskPyramid, SparseEncoder
from sparkmim.sparse import SparseMap, to_dense

P = 8  # patch size of the network below
TOL = dict(rtol=1e-10, atol=1e-12)


class SplitChunk(nn.Module):
    out = 8

    def forward(self, x):
        a, b = x.split([3, 5], dim=1)
        c, d = b.chunk(2, dim=1)
        e, f = torch.split(x, 4, 1)
        return torch.cat([d * 2.0, a.sigmoid(), c], dim=1) + torch.cat([f, e], dim=1)


class NarrowSelect(nn.Module):
    out = 8

    def forward(self, x):
        n = x.narrow(1, 2, 4)
        s = x.select(1, 0)  # (B, H, W)
        return torch.cat([n, s.unsqueeze(1) * n[:, :1], torch.narrow(x, -3, 5, 3)], dim=1)


class GetItem(nn.Module):
    out = 11

    def forward(self, x):
        return torch.cat([x[..., 2:6, :, :], x[:, ::2], x[:, 1].unsqueeze(1), x[:, -2:, ...]], dim=1)


class CatChannels(nn.Module):
    out = 16

    def forward(self, x):
        y = torch.cat([x, -x.relu()], dim=1)
        return torch.cat((y[:, :5], y[:, 5:]), dim=-3)


class ChannelReductions(nn.Module):
    out = 8 + 8 + 8 + 1 + 1 + 1 + 3

    def forward(self, x):
        s, m, top = x.sum(1, keepdim=True), x.mean(dim=1, keepdim=True), x.amax(1, keepdim=True)
        soft, scan = torch.softmax(x, dim=1), x.cumsum(1)
        arg = x.argmax(1, keepdim=True).to(x.dtype)
        values, index = x.max(dim=1)
        std, mean = torch.std_mean(x, dim=1, keepdim=True)
        dropped = torch.stack([x.sum(1), x.mean(-3), torch.logsumexp(x, 1)], dim=1)  # (B, 3, H, W)
        return torch.cat([soft * s, scan * 0.1 + m, torch.log_softmax(x, 1) - top,
                          arg, values.unsqueeze(1), index.unsqueeze(1).to(x.dtype) + std + mean, dropped], dim=1)


class SqueezeUnsqueeze(nn.Module):
    out = 8 + 8 + 1

    def forward(self, x):
        y = (x.unsqueeze(2) * 2.0).squeeze(2)
        z = x.unsqueeze(1).squeeze(1)
        one = x[:, :1].squeeze(1).unsqueeze(1)
        return torch.cat([y, z.tanh(), one], dim=1)


class FlattenReshape(nn.Module):
    out = 8 + 4 + 8

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 2).view(1, 2, 1, 1, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        groups = (x.reshape(b, 2, 4, h, w) * self.scale).flatten(1, 2)
        pairs = x.view(b, 4, 2, h, w).sum(2)
        again = x.unflatten(1, (4, 2)).flatten(1, 2)
        return torch.cat([groups, pairs, again], dim=1)


class PermuteChannelsLast(nn.Module):
    """ConvNeXt-style: channels-last LayerNorm + Linear, and back."""

    out = 8 + 1

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(self.norm(x.permute(0, 2, 3, 1)))
        gate = y.mean(-1, keepdim=True)  # a reduction over the channels of a channels-last map
        back = y.permute(0, 3, 1, 2) + x.movedim(1, -1).movedim(-1, 1)
        return torch.cat([back, gate.permute(0, 3, 1, 2)], dim=1)


class UnbindStack(nn.Module):
    out = 8

    def forward(self, x):
        parts = x.unbind(1)
        return torch.stack(parts[::-1], dim=1)


CASES = [SplitChunk, NarrowSelect, GetItem, CatChannels, ChannelReductions, SqueezeUnsqueeze, FlattenReshape,
         PermuteChannelsLast, UnbindStack]


class Net(nn.Module):
    """stem (stride 2) -> a (stride 4) -> the op -> b (stride 8)."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8))
        self.op = op
        self.b = nn.Sequential(nn.Conv2d(op.out, 16, 3, 2, 1), nn.BatchNorm2d(16))

    def forward(self, x):
        return self.b(self.op(self.a(self.stem(x))))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2 * P, 3 * P, generator=g, dtype=torch.float64)
    v = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    v[0, 0, 0, 0] = v[0, 0, 1, 2] = v[0, 0, 1, 1] = v[1, 0, 0, 1] = v[1, 0, 1, 0] = v[1, 0, 0, 2] = True
    return x, MaskPyramid(v, keep=3)


def run(model: Net, impl: str):
    enc = SparseEncoder(copy.deepcopy(model), ["a", "b"], probe_size=32, sparse_impl=impl).train()
    assert enc.sparse_impl == impl, "the build-time check fell back to the reference form"
    seen = {}

    def record(module, args, out):
        seen.update(types=(type(args[0]), type(out)), input=to_dense(args[0]).detach().clone(),
                    output=to_dense(out).detach().clone())

    enc.model.op.register_forward_hook(record)
    x, masks = data()
    feats = enc(x, masks)
    g = torch.Generator().manual_seed(1)
    sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in feats).backward()
    grads = {k: p.grad.clone() for k, p in enc.model.named_parameters() if p.grad is not None}
    buffers = {k: b.clone() for k, b in enc.model.named_buffers()}
    return feats, grads, buffers, seen, enc


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_fast_translation_equals_the_masked_dense_computation_and_the_reference_form(case):
    torch.manual_seed(0)
    model = Net(case()).double()
    _, masks = data()
    visible = masks.at(2)  # the op runs at stride 4: 2 x 2 sites per patch
    results = {}
    for impl in ("fast", "reference"):
        feats, grads, buffers, seen, enc = run(model, impl)
        expected_type = SparseMap if impl == "fast" else torch.Tensor
        assert all(t is expected_type for t in seen["types"]), (impl, seen["types"])
        dense = type(enc.model.op).forward(enc.model.op, seen["input"])  # outside any sparse form
        torch.testing.assert_close(torch.where(visible, seen["output"], 0.0), torch.where(visible, dense, 0.0), **TOL)
        results[impl] = feats, grads, buffers
    (ff, gf, bf), (fr, gr, br) = results["fast"], results["reference"]
    for a, b in zip(ff, fr):
        torch.testing.assert_close(a, b, **TOL)
    assert gf.keys() == gr.keys() and len(gr) == len(list(model.parameters()))
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], **TOL, msg=lambda m, k=k: f"grad {k}: {m}")
    for k in br:
        torch.testing.assert_close(bf[k], br[k], **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")


class SpatialReductions(nn.Module):
    """Reductions over both spatial dims (visible sites only), channels first and last."""

    out = 8

    def forward(self, x):
        mean = x.mean((2, 3), keepdim=True)
        top = x.amax(dim=(-2, -1), keepdim=True)
        total = x.permute(0, 2, 3, 1).sum((1, 2))  # (B, C)
        return x * torch.sigmoid(mean + top) + total[:, :, None, None] * 0.01


def test_reductions_over_the_spatial_dims_are_over_visible_sites_in_both_forms():
    torch.manual_seed(0)
    model = Net(SpatialReductions()).double()
    _, masks = data()
    visible = masks.at(2)
    results = {}
    for impl in ("fast", "reference"):
        feats, grads, buffers, seen, enc = run(model, impl)
        x = seen["input"]
        count = visible.sum((2, 3), keepdim=True)
        kept = torch.where(visible, x, 0.0)
        mean = kept.sum((2, 3), keepdim=True) / count
        top = x.masked_fill(~visible, float("-inf")).amax((2, 3), keepdim=True)
        want = x * torch.sigmoid(mean + top) + kept.sum((2, 3), keepdim=True) * 0.01
        torch.testing.assert_close(torch.where(visible, seen["output"], 0.0), torch.where(visible, want, 0.0), **TOL)
        results[impl] = feats, grads
    for a, b in zip(results["fast"][0], results["reference"][0]):
        torch.testing.assert_close(a, b, **TOL)
    for k, g in results["reference"][1].items():
        torch.testing.assert_close(results["fast"][1][k], g, **TOL)


class MovesSpatialDims(nn.Module):
    out = 8

    def forward(self, x):
        return x.transpose(2, 3).transpose(2, 3)


class SplitsSpatialDims(nn.Module):
    out = 8

    def forward(self, x):
        top, bottom = x.chunk(2, dim=2)
        return torch.cat([bottom, top], dim=2)


@pytest.mark.parametrize("case", [MovesSpatialDims, SplitsSpatialDims])
def test_ops_that_move_sites_are_refused_in_both_forms(case):
    from sparkmim import SparseSemanticsError

    for impl in ("fast", "reference"):
        with pytest.raises(SparseSemanticsError, match=r"in module 'op'"):
            SparseEncoder(Net(case()).double(), ["a", "b"], probe_size=32, sparse_impl=impl)
