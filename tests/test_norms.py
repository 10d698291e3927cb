"""Norms over visible sites (sparkmim.norms), checked against hand computations in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparkmim import norms
from sparkmim.masking import MaskPyramid
from sparkmim.norms import (
    ChannelLayerNorm,
    MaskedBatchNorm,
    SyncableBatchNorm,
    batch_norm_rows,
    like_format,
    masked_batch_norm,
    masked_group_stats_norm,
)


def masks(factor=2):
    v = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    v[0, 0, 0, 0] = v[0, 0, 1, 2] = v[1, 0, 0, 1] = v[1, 0, 1, 1] = True
    m = MaskPyramid(v, keep=2)
    x = torch.randn(2, 5, 2 * factor, 3 * factor, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x, m


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_rows_without_a_group_is_batch_norm(training):
    rows = torch.randn(7, 3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    out = batch_norm_rows(rows, rm, rv, w, b, training, None, 1e-5)
    want = F.batch_norm(rows, rm2, rv2, w, b, training, 0.1, 1e-5)  # momentum None means 0.1 here
    torch.testing.assert_close(out, want)
    torch.testing.assert_close((rm, rv), (rm2, rv2))


def test_masked_batch_norm_takes_statistics_from_visible_sites_only():
    x, m = masks()
    c = x.shape[1]
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    out = masked_batch_norm(x, m, 2, rm, rv, w, b, True, 0.1, 1e-5)
    vis = m.at(2)[:, 0]
    rows = x.permute(0, 2, 3, 1)[vis]
    mean, var_b, var_u = rows.mean(0), rows.var(0, unbiased=False), rows.var(0)
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[vis], (rows - mean) / torch.sqrt(var_b + 1e-5) * w + b)
    assert out.permute(0, 2, 3, 1)[~vis].abs().sum() == 0
    torch.testing.assert_close(rm, 0.1 * mean)
    torch.testing.assert_close(rv, 0.9 + 0.1 * var_u)
    # eval: running statistics, visible sites kept, masked sites zero
    ev = masked_batch_norm(x, m, 2, rm, rv, w, b, False, 0.1, 1e-5)
    want = (x - rm[:, None, None]) / torch.sqrt(rv[:, None, None] + 1e-5) * w[:, None, None] + b[:, None, None]
    torch.testing.assert_close(ev, torch.where(m.at(2), want, 0.0))


@pytest.mark.parametrize("groups", [1, 5])
def test_masked_group_stats_norm_uses_each_samples_visible_sites(groups):
    x, m = masks()
    w, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    out = masked_group_stats_norm(x, m.at(2), groups, w, b, 1e-5)
    per = 5 // groups
    for s in range(2):
        vis = m.at(2)[s, 0]
        for g in range(groups):
            vals = x[s, g * per:(g + 1) * per].permute(1, 2, 0)[vis]
            want = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + 1e-5)
            want = want * w[g * per:(g + 1) * per] + b[g * per:(g + 1) * per]
            torch.testing.assert_close(out[s, g * per:(g + 1) * per].permute(1, 2, 0)[vis], want)
    assert (out * ~m.at(2)).abs().sum() == 0


def test_like_format_follows_the_reference_layout():
    out = torch.randn(2, 3, 4, 5)
    cl = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert like_format(out, cl).is_contiguous(memory_format=torch.channels_last)
    assert like_format(out.contiguous(memory_format=torch.channels_last), out).is_contiguous()
    assert like_format(out, torch.randn(2, 1, 1, 1).contiguous(memory_format=torch.channels_last)).is_contiguous()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_syncable_batch_norm_without_a_group_is_batch_norm2d(momentum):
    torch.manual_seed(0)
    ours, theirs = SyncableBatchNorm(4, momentum=momentum).double(), nn.BatchNorm2d(4, momentum=momentum).double()
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)


def test_masked_norm_modules():
    x, m = masks()
    bn = MaskedBatchNorm(5).double().train()
    out = bn(x, m, 2)
    torch.testing.assert_close(out, masked_batch_norm(x, m, 2, torch.zeros(5, dtype=torch.float64),
                                                      torch.ones(5, dtype=torch.float64), bn.weight, bn.bias, True,
                                                      0.1, bn.eps))
    assert int(bn.num_batches_tracked) == 1  # counted like BatchNorm2d counts
    ln = ChannelLayerNorm(5, eps=1e-6).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    want = F.layer_norm(x.permute(0, 2, 3, 1), (5,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x, m, 2), want)
    torch.testing.assert_close(ln(x), want)  # the mask is not needed


def test_norms_module_has_no_sparse_dependency():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(norms))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert imported <= {"masking"}, imported
