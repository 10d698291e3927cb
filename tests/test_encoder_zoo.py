"""Correctness properties of the sparse encoder over a zoo of timm and torchvision backbones.

P1 no leakage, isolation (sparse, not zero-out, semantics), P2 dense equivalence (train and
eval, features, gradients and running statistics), P3 weight identity and strict export.
Everything runs in float64 so tolerances can be tight.
"""

import copy

import pytest
import timm
import torch

from conftest import (
    TIMM_ZOO,
    TIMM_ZOO_SLOW,
    TORCHVISION_ZOO,
    P,
    assert_fast_form_stays_on_the_meta_device,
    buffers,
    fresh,
    projected_run,
    run_in_form,
)
from sparkmim import MaskPyramid, SparseEncoder, random_visible
from sparkmim.backbones import create_backbone, create_timm, create_torchvision
from sparkmim.checkpoint import load_encoder_weights, save_encoder_weights

ZOO = [pytest.param(("timm", n), id=f"timm-{n}", marks=[pytest.mark.slow] if n in TIMM_ZOO_SLOW else [])
       for n, _ in TIMM_ZOO] + [
    pytest.param(("torchvision", n), id=f"tv-{n}") for n in TORCHVISION_ZOO
]
TOL = dict(rtol=1e-9, atol=1e-9)
REFLECT_PADDED = {"resnetblur18"}  # BlurPool pads by reflection


def build(kind, name):
    torch.manual_seed(0)
    model = create_timm(name) if kind == "timm" else create_torchvision(name)
    return model.double()


@pytest.fixture(scope="module", params=ZOO)
def zoo(request):
    kind, name = request.param
    enc = SparseEncoder(build(kind, name))
    assert enc.sparse_impl == "fast", f"{name}: the build-time check fell back to the reference form"
    return kind, name, enc


def images(batch=2, h=2 * P, w=3 * P, chans=3, seed=0):
    return torch.randn(batch, chans, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def masks_for(batch=2, grid=(2, 3), seed=0, ratio=0.6):
    v = random_visible(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))
    return MaskPyramid(v, keep=int(v[0].sum()))


def assert_grads_close(actual, expected, rel=1e-10):
    """Gradients agree to ``rel`` in norm, per parameter tensor. (Single entries that are sums of
    large cancelling terms may differ more in relative terms, from summation order alone.)"""
    assert actual.keys() == expected.keys() and len(expected) > 0
    for k in expected:
        err = (actual[k] - expected[k]).norm()
        scale = expected[k].norm()
        assert err <= rel * scale + 1e-10, f"grad {k}: relative error {float(err / scale):.2e}"


def test_strides_and_channels(zoo):
    _, _, enc = zoo
    assert enc.strides == (4, 8, 16, 32)
    feats = enc(images())
    assert [f.shape[1] for f in feats] == list(enc.channels)
    assert [tuple(f.shape[-2:]) for f in feats] == [(2 * P // s, 3 * P // s) for s in enc.strides]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_p2_dense_equivalence(zoo, train):
    """With every patch visible the sparse encoder is the original model: features, gradients,
    running statistics."""
    _, _, enc = zoo
    x = images()
    full = MaskPyramid(torch.ones(2, 1, 2, 3, dtype=torch.bool), keep=6)
    (fd, gd, bd), (fs, gs, bs) = projected_run(enc, x, None, train), projected_run(enc, x, full, train)
    for a, b in zip(fd, fs):
        torch.testing.assert_close(b, a, **TOL)
    assert_grads_close(gs, gd)
    for k in bd:
        torch.testing.assert_close(bs[k], bd[k], **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")


def test_p1_no_leakage(zoo):
    """Changing masked pixels changes nothing: no output, no running statistic, no gradient."""
    _, _, enc = zoo
    masks = masks_for()
    x1 = images(seed=1)
    noise = 50 * images(seed=2)
    full = masks.at(P)
    x2 = torch.where(full, x1, noise)
    outs = []
    for x in (x1, x2):
        e = fresh(enc).train()
        feats = e(x, masks)
        sum(f.square().sum() for f in feats).backward()
        grads = {k: p.grad for k, p in e.model.named_parameters() if p.grad is not None}
        outs.append((feats, buffers(e), grads))
    (f1, b1, g1), (f2, b2, g2) = outs
    for s, a, b in zip(enc.strides, f1, f2):
        assert torch.equal(a, b)
        assert (a.abs() * ~masks.at(P // s)).sum() == 0, "masked sites must be empty"
        assert (a.abs() * masks.at(P // s)).sum() > 0
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


@pytest.mark.parametrize("name", ["timm:resnet18", "timm:convnext_atto", "torchvision:efficientnet_b0"])
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


def test_isolation_sparse_not_zero_out(zoo):
    """Sparse semantics: a sample with one visible patch is encoded exactly like that patch
    alone (cropped, dense), in training mode with batch statistics, including the running
    statistics. Zero-out masking fails this (masked zeros are convolved into the patch)."""
    kind, name, enc = zoo
    if name in REFLECT_PADDED:
        pytest.skip("reflect padding reads the crop's own pixels at its border, where the sparse encoder "
                    "reads absent (zero) neighbours: the crop is not a valid reference for this model")
    where = [(0, 2), (1, 1), (0, 0), (1, 2), (0, 1), (1, 0)]  # batch statistics over 6 sites at stride 32
    x = images(batch=len(where), seed=3)
    v = torch.zeros(len(where), 1, 2, 3, dtype=torch.bool)
    for b, (i, j) in enumerate(where):
        v[b, 0, i, j] = True
    crops = torch.stack([x[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P] for b, (i, j) in enumerate(where)])
    e_sparse = fresh(enc).train()
    sparse = e_sparse(x, MaskPyramid(v, keep=1))
    e_dense = fresh(enc).train()
    dense = e_dense(crops)
    for s, fs, fd in zip(enc.strides, sparse, dense):
        f = P // s
        for b, (i, j) in enumerate(where):
            torch.testing.assert_close(fs[b, :, i * f:(i + 1) * f, j * f:(j + 1) * f], fd[b], **TOL)
    bs, bd = buffers(e_sparse), buffers(e_dense)
    for k in bs:
        torch.testing.assert_close(bs[k], bd[k], **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fast_equals_reference(zoo, train):
    """The fast implementation (visible rows only) gives the reference implementation's (dense
    then mask) features, loss, gradients and running statistics, on a non-square input; and it
    really runs in the fast form for every zoo model. (Batch 4 with half the patches visible, so
    batch statistics at stride 32 come from 12 sites: with 4, some models' train-mode gradients
    reach 1e7 and float64 summation order alone moves them by 2e-10 relative.)"""
    _, name, enc = zoo
    x, masks = images(batch=4, seed=4), masks_for(batch=4, seed=5, ratio=0.5)
    ff, lf, gf, bf, held = run_in_form(enc, "fast", x, masks, train)
    fr, lr, gr, br, _ = run_in_form(enc, "reference", x, masks, train)
    assert held, f"{name}: the fast form fell back to dense maps"
    for a, b in zip(ff, fr):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=0)
    assert_grads_close(gf, gr)
    for k in br:
        torch.testing.assert_close(bf[k], br[k], **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")


@pytest.mark.parametrize("name,device", [("resnet18", "cuda"), ("convnext_atto", "cuda"), ("convnext_atto", "other"),
                                         ("efficientnet_b0", "other"), ("mobilenetv3_large_100", "cuda")])
def test_fast_with_the_kernel_choices_of_a_gpu_equals_reference(name, device, monkeypatch):
    """The fast form picks some layer kernels by device type (on CPU: depthwise layers on tiles
    smaller than 4 x 4 on the canvas, one-site convolutions as im2col products). With the choices
    a CUDA device makes (depthwise layers on the canvas below 16 x 16, convolution everywhere) and
    those of other devices (halo and convolution everywhere), run here on the CPU, it still equals
    the reference form."""
    from sparkmim.sparse import fast

    below = {"cpu": fast.CANVAS_DEPTHWISE_BELOW["cuda"]} if device == "cuda" else {}
    monkeypatch.setattr(fast, "CANVAS_DEPTHWISE_BELOW", below)
    monkeypatch.setattr(fast, "IM2COL_ONE_SITE", frozenset())
    enc = SparseEncoder(build("timm", name))
    x, masks = images(batch=4, seed=4), masks_for(batch=4, seed=5, ratio=0.5)
    for train in (True, False):
        ff, lf, gf, bf, held = run_in_form(enc, "fast", x, masks, train)
        fr, lr, gr, br, _ = run_in_form(enc, "reference", x, masks, train)
        assert held
        for a, b in zip(ff, fr):
            torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(lf, lr, rtol=1e-10, atol=0)
        assert_grads_close(gf, gr)


def test_fast_form_keeps_every_tensor_on_the_input_device(zoo):
    """The fast form's forward and backward on the ``meta`` device: a tensor created on the CPU
    (an index, a canvas, a constant) meets the meta inputs and fails as it would on a GPU, and a
    value read by the host fails too (meta tensors hold no data). So the fast form runs on any
    device and never waits for one, for every zoo model."""
    _, name, enc = zoo
    v = random_visible(2, (2, 3), 0.6, generator=torch.Generator().manual_seed(0))
    assert_fast_form_stays_on_the_meta_device(enc, images(), v, name)


def test_p3_weight_identity_and_strict_export(zoo, tmp_path):
    kind, name, enc = zoo
    reference = build(kind, name)
    own, ref = enc.model.state_dict(), reference.state_dict()
    assert list(own) == list(ref)
    assert all(own[k].shape == ref[k].shape for k in own)
    # train one step so exported weights differ from a fresh init, then export and reload strictly
    e = fresh(enc).train()
    opt = torch.optim.SGD(e.parameters(), lr=0.1)
    sum(f.mean() for f in e(images(), masks_for())).backward()
    opt.step()
    path = save_encoder_weights(e, tmp_path / "encoder.safetensors")
    target = build(kind, name).float()
    report = load_encoder_weights(target, path, strict=True)
    assert not report["missing"] and not report["unexpected"] and not report["shape_mismatch"]
    for k, v in target.state_dict().items():
        assert torch.equal(v, e.model.state_dict()[k].to(v.dtype)), k


def test_timm_zoo_covers_enough_families():
    default = [(n, fam) for n, fam in TIMM_ZOO if n not in TIMM_ZOO_SLOW]  # what every CI run checks
    assert len(default) >= 20 and len({fam.split(" ")[0] for _, fam in default}) >= 12
    assert all(timm.is_model(n) for n, _ in TIMM_ZOO)
