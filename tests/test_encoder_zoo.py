"""The image zoo's own checks: stochastic depth leaks nothing in either sparse form, and the
timm zoo covers enough families. The properties every zoo model must have, for images and
volumes alike, are in ``test_properties.py``."""

import copy

import pytest
import timm
import torch

from conftest import TIMM_ZOO, TIMM_ZOO_SLOW, P, buffers
from sparkmim import MaskPyramid, SparseEncoder, random_visible
from sparkmim.backbones import create_backbone

TOL = dict(rtol=1e-9, atol=1e-9)


def images(batch=2, h=2 * P, w=3 * P, chans=3, seed=0):
    return torch.randn(batch, chans, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def masks_for(batch=2, grid=(2, 3), seed=0, ratio=0.6):
    v = random_visible(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))
    return MaskPyramid(v, keep=int(v[0].sum()))


def assert_grads_close(actual, expected, rel=1e-10):
    """Gradients agree to ``rel`` in norm, per parameter tensor."""
    assert actual.keys() == expected.keys() and len(expected) > 0
    for k in expected:
        err = (actual[k] - expected[k]).norm()
        scale = expected[k].norm()
        assert err <= rel * scale + 1e-10, f"grad {k}: relative error {float(err / scale):.2e}"





@pytest.mark.parametrize("name", ["timm:resnet18", *[pytest.param(n, marks=pytest.mark.slow)  # 13-22 s each on busy cores
                                                      for n in ("timm:convnext_atto", "torchvision:efficientnet_b0")]])
def test_p1_no_leakage_with_drop_path(name):
    """Stochastic depth scales whole samples, so with it on (rate 0.5, train mode, the same random
    numbers for both runs) changing masked pixels still changes no output, gradient or running
    statistic, in both sparse forms; the two forms agree; and the drop really happens (other
    random numbers give other features)."""
    torch.manual_seed(0)
    base = create_backbone(name, drop_path=0.5).double()
    with torch.no_grad():  # residual branches that start at zero (timm's zero-init last BN, layer scale) would hide the drop
        for n, p in base.named_parameters():
            if n.endswith("gamma") or (n.endswith("bn2.weight") and not p.any()):
                p.uniform_(0.5, 1.5)
    masks = masks_for(batch=4, seed=6)
    x1 = images(batch=4, seed=1)
    x2 = torch.where(masks.at(P), x1, 50 * images(batch=4, seed=2))

    def run(enc, x, seed):
        e = copy.deepcopy(enc).train()
        torch.manual_seed(seed)
        feats = e(x, masks)
        sum(f.square().sum() for f in feats).backward()
        return feats, {k: p.grad for k, p in e.model.named_parameters() if p.grad is not None}, buffers(e)

    forms = {}
    for impl in ("fast", "reference"):
        enc = SparseEncoder(copy.deepcopy(base), sparse_impl=impl)
        assert enc.sparse_impl == impl
        (f1, g1, b1), (f2, g2, b2) = run(enc, x1, 7), run(enc, x2, 7)
        assert all(torch.equal(a, b) for a, b in zip(f1, f2)), f"{impl}: masked pixels leak into the features"
        assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1), f"{impl}: gradients leak"
        assert all(torch.equal(b1[k], b2[k]) for k in b1), f"{impl}: running statistics leak"
        other, _, _ = run(enc, x1, 8)
        assert not all(torch.equal(a, b) for a, b in zip(f1, other)), "stochastic depth did not act"
        forms[impl] = (f1, g1)
    (ff, gf), (fr, gr) = forms["fast"], forms["reference"]
    for a, b in zip(ff, fr):
        torch.testing.assert_close(a, b, **TOL)
    assert_grads_close(gf, gr)


def test_timm_zoo_covers_enough_families():
    default = [(n, fam) for n, fam in TIMM_ZOO if n not in TIMM_ZOO_SLOW]  # what every CI run checks
    assert len(default) >= 20 and len({fam.split(" ")[0] for _, fam in default}) >= 12
    assert all(timm.is_model(n) for n, _ in TIMM_ZOO)
