"""Correctness properties of the sparse encoder over one zoo of 2-D and 3-D backbones.

P1 no leakage, isolation (sparse, not zero-out, semantics), P2 dense equivalence (train and
eval: features, gradients, running statistics), P3 weight identity and strict export, the fast
form against the reference form, and the fast form on the ``meta`` device (no tensor made on
another device, no value read by the host). Images and volumes are the same tests over one
parametrised table: timm and torchvision image models on 2 x 3 patches, custom, MONAI and
torchvision video models on 2 x 2 x 3 patches (non-cubic, some with anisotropic patches).
Everything runs in float64 so tolerances can be tight. The slow marker keeps the long tail.
"""

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from conftest import (
    TIMM_ZOO,
    TIMM_ZOO_SLOW,
    TORCHVISION_SLOW,
    TORCHVISION_ZOO,
    assert_fast_form_stays_on_the_meta_device,
    buffers,
    fresh,
    projected_run,
    run_in_form,
)
from nets3d import build3d
from sparkmim import MaskPyramid, SparseEncoder, random_visible
from sparkmim.backbones import create_timm, create_torchvision
from sparkmim.weights import load_encoder_weights, save_encoder_weights

TOL = dict(rtol=1e-9, atol=1e-9)


@dataclass(frozen=True)
class Case:
    """One zoo model: how to build it (``(model, in_chans, feature_modules)``, float64), the patch
    grid its inputs hold, the patch size and number of scales it must have, the sparse forms in
    which P1, P2 and isolation run, and why isolation has no dense reference (if so)."""

    id: str
    kind: str
    name: str
    grid: tuple[int, ...]
    patch: tuple[int, ...]
    scales: int = 4
    forms: tuple[str, ...] = ("fast",)
    no_isolation: str | None = None
    slow: bool = False
    marks: tuple = field(default=())

    def build(self):
        torch.manual_seed(0)
        if self.kind == "timm":
            return create_timm(self.name).double(), 3, None
        if self.kind == "torchvision":
            return create_torchvision(self.name).double(), 3, None
        if self.kind == "monai2d":  # MONAI's 2-D networks, found by the probe (no feature_info)
            nets = pytest.importorskip("monai.networks.nets")
            return nets.EfficientNetBN(self.name, pretrained=False, spatial_dims=2, in_channels=3, num_classes=2).double(), 3, None
        return build3d(self.name)


REFLECT = ("reflect padding reads the crop's own pixels at its border, where the sparse encoder reads absent "
           "(zero) neighbours: the crop is not a valid reference for this model")
ONE_SITE_INSTANCE_NORM = ("the crop of one patch is a single site at the coarsest map, where PyTorch refuses an "
                          "instance norm in training ('Expected more than 1 spatial element'): no dense reference")
BOTH = ("fast", "reference")
IMAGE_GRID, VOLUME_GRID = (2, 3), (2, 2, 3)
# the visible patch of each sample in the isolation test (batch statistics at the coarsest stride over 6 sites)
ISOLATED = {IMAGE_GRID: [(0, 2), (1, 1), (0, 0), (1, 2), (0, 1), (1, 0)],
            VOLUME_GRID: [(0, 0, 2), (1, 1, 1), (0, 1, 0), (1, 0, 2), (0, 0, 1), (1, 1, 0)]}

CASES = [Case(f"timm-{n}", "timm", n, IMAGE_GRID, (32, 32), no_isolation=REFLECT if n == "resnetblur18" else None,
              slow=n in TIMM_ZOO_SLOW) for n, _ in TIMM_ZOO]
# torchvision's ConvNeXt (20 s over the property tests) is slow: timm's ConvNeXt runs by default
# torchvision's VGG, EfficientNet and RegNet share their operations with timm's of the default set
CASES += [Case(f"tv-{n}", "torchvision", n, IMAGE_GRID, (32, 32), slow=n in TORCHVISION_SLOW) for n in TORCHVISION_ZOO]
# MONAI's EfficientNet: an activation module run by the stem and the head, "same" padding as separate layers
# (slow: a minute; tests/test_features.py checks the discovery rules on a small model of that pattern)
CASES += [Case("monai2d-efficientnet-b0", "monai2d", "efficientnet-b0", IMAGE_GRID, (32, 32), slow=True)]
CASES += [
    Case("3d-custom", "3d", "custom", VOLUME_GRID, (8, 16, 16), forms=BOTH),
    Case("3d-custom-next", "3d", "custom-next", VOLUME_GRID, (8, 16, 16), scales=3, forms=BOTH),
    Case("3d-monai-resnet10", "3d", "monai-resnet10", VOLUME_GRID, (16, 16, 16), forms=BOTH),
    Case("3d-monai-segresnet", "3d", "monai-segresnet", VOLUME_GRID, (8, 8, 8), scales=3, forms=BOTH, slow=True),
    Case("3d-monai-dynunet", "3d", "monai-dynunet", VOLUME_GRID, (16, 16, 16), forms=BOTH,
         no_isolation=ONE_SITE_INSTANCE_NORM),
    # nnU-Net's ResEnc and plain networks (narrow; the encoder's stages 1-5 are decoded)
    Case("3d-nnunet-small-resenc_l", "3d", "nnunet-small-resenc_l", VOLUME_GRID, (8, 8, 8), scales=3, forms=BOTH,
         no_isolation=ONE_SITE_INSTANCE_NORM),
    Case("3d-nnunet-small-plain", "3d", "nnunet-small-plain", VOLUME_GRID, (8, 8, 8), scales=3, forms=BOTH,
         no_isolation=ONE_SITE_INSTANCE_NORM),
    # nnU-Net plans files: an anisotropic ResEnc plan (every stage decoded, in-plane-only strides) and a plain one
    Case("3d-nnunet-plan-anisotropic", "3d", "nnunet-plan-anisotropic", VOLUME_GRID, (2, 8, 8), scales=3,
         forms=BOTH, no_isolation=ONE_SITE_INSTANCE_NORM),
    Case("3d-nnunet-plan-plain", "3d", "nnunet-plan-plain", VOLUME_GRID, (8, 8, 8), scales=3, forms=BOTH,
         no_isolation=ONE_SITE_INSTANCE_NORM),
    Case("3d-nnunet:resenc_l", "3d", "nnunet:resenc_l", VOLUME_GRID, (32, 32, 32), scales=5, forms=BOTH,
         no_isolation=ONE_SITE_INSTANCE_NORM, slow=True),
    Case("3d-mc3_18", "3d", "mc3_18", VOLUME_GRID, (1, 16, 16), forms=BOTH, slow=True),
    Case("3d-r3d_18", "3d", "r3d_18", VOLUME_GRID, (8, 16, 16), forms=BOTH, slow=True),
    Case("3d-r2plus1d_18", "3d", "r2plus1d_18", VOLUME_GRID, (8, 16, 16), forms=BOTH, slow=True),
    Case("3d-s3d", "3d", "s3d", VOLUME_GRID, (8, 32, 32), forms=BOTH, slow=True),
    Case("3d-monai-resnet50", "3d", "monai:resnet50", VOLUME_GRID, (16, 16, 16), forms=BOTH, slow=True),
    Case("3d-monai-densenet121", "3d", "monai:densenet121", VOLUME_GRID, (32, 32, 32), scales=5, forms=BOTH,
         slow=True),
    Case("3d-monai-efficientnet-b0", "3d", "monai-efficientnet-b0", VOLUME_GRID, (32, 32, 32), scales=5, forms=BOTH,
         slow=True),
]


def _param(case: Case, *rest, suffix: str = ""):
    return pytest.param(case, *rest, id=case.id + suffix, marks=[pytest.mark.slow] if case.slow else [])


def pytest_generate_tests(metafunc):
    """``zoo`` (one built encoder per case and module) alone, or with each sparse form ``impl`` of
    its case (P1, P2 and isolation)."""
    if "zoo" not in metafunc.fixturenames:
        return
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize(["zoo", "impl"], [_param(c, impl, suffix=f"-{impl}") for c in CASES for impl in c.forms],
                             indirect=["zoo"], scope="module")
    else:
        metafunc.parametrize("zoo", [_param(c) for c in CASES], indirect=True, scope="module")


@pytest.fixture(scope="module")
def zoo(request):
    case = request.param
    model, chans, names = case.build()
    enc = SparseEncoder(model, feature_modules=names)
    assert enc.sparse_impl == "fast", f"{case.id}: the build-time check fell back to the reference form"
    return case, enc, chans


def inputs(enc, chans, grid, batch=2, seed=0):
    sizes = [g * p for g, p in zip(grid, enc.patch_size)]
    return torch.randn(batch, chans, *sizes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def masks_for(grid, batch=2, seed=0, ratio=0.6):
    v = random_visible(batch, grid, ratio, generator=torch.Generator().manual_seed(seed))
    return MaskPyramid(v, keep=int(v[0].sum()))


def _cancelled_biases(model, train: bool) -> dict[str, str]:
    """``{bias: weight}`` of the convolutions whose output goes straight into a norm that removes
    any constant per channel (the next module of the same ``Sequential``: MONAI's ``downsample``,
    nnU-Net's conv-norm-nonlin): a batch norm in training, an instance norm without running
    statistics always. Their bias gradient is zero in exact arithmetic, so both sides hold
    rounding noise only (measured against the weight's gradient instead)."""
    def cancels(norm) -> bool:
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            return train
        return isinstance(norm, nn.modules.instancenorm._InstanceNorm) and (train or not norm.track_running_stats)

    names = {id(p): n for n, p in model.named_parameters()}  # a module held twice is named once
    found = {}
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            for a, b in zip(list(m.children())[:-1], list(m.children())[1:]):
                if isinstance(a, (nn.Conv2d, nn.Conv3d)) and a.bias is not None and cancels(b):
                    found[names[id(a.bias)]] = names[id(a.weight)]
    return found


def assert_grads_close(actual, expected, model, train, rel=1e-10, noise_only=False):
    """Gradients agree to ``rel`` in norm, per parameter tensor. (Single entries that are sums of
    large cancelling terms may differ more in relative terms, from summation order alone.) A bias
    whose gradient a batch norm cancels is measured against its weight's gradient, or, with
    ``noise_only``, must be rounding noise (<= 1e-12 of it) on both sides."""
    assert actual.keys() == expected.keys() and len(expected) > 0
    cancelled = _cancelled_biases(model, train)
    for k in expected:
        scale = expected[cancelled.get(k, k)].norm()
        if noise_only and k in cancelled:
            assert actual[k].norm() <= 1e-12 * scale and expected[k].norm() <= 1e-12 * scale, k
            continue
        err = (actual[k] - expected[k]).norm()
        assert err <= rel * scale + 1e-10, f"grad {k}: relative error {float(err / scale):.2e}"


def test_strides_patch_and_feature_sizes(zoo):
    case, enc, chans = zoo
    assert enc.spatial_dims == len(case.grid) and enc.patch_size == case.patch
    assert len(enc.strides) == case.scales
    assert enc.factors == tuple(tuple(p // s for p, s in zip(enc.patch_size, st)) for st in enc.strides)
    x = inputs(enc, chans, case.grid)
    feats = enc(x)
    assert [f.shape[1] for f in feats] == list(enc.channels)
    for f, s in zip(feats, enc.strides):
        assert tuple(f.shape[2:]) == tuple(a // b for a, b in zip(x.shape[2:], s))


def test_p1_no_leakage(zoo, impl):
    """Changing masked pixels (voxels) changes nothing: no output, no running statistic, no
    gradient; masked sites of every feature map are exactly zero."""
    case, enc, chans = zoo
    masks = masks_for(case.grid)
    x1 = inputs(enc, chans, case.grid, seed=1)
    x2 = torch.where(masks.at(enc.patch_size), x1, 50 * inputs(enc, chans, case.grid, seed=2))
    outs = []
    for x in (x1, x2):
        e = fresh(enc).train()
        with e.using(impl):
            feats = e(x, masks)
        sum(f.square().sum() for f in feats).backward()
        outs.append((feats, buffers(e), {k: p.grad for k, p in e.model.named_parameters() if p.grad is not None}))
    (f1, b1, g1), (f2, b2, g2) = outs
    for factor, a, b in zip(enc.factors, f1, f2):
        assert torch.equal(a, b)
        assert (a.abs() * ~masks.at(factor)).sum() == 0, "masked sites must be empty"
        assert (a.abs() * masks.at(factor)).sum() > 0
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)
    assert len(g1) > 0 and g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)


# eval mode (running statistics) is run with -m slow: train mode, where batch statistics could leak, by default
TRAIN_EVAL = [pytest.param(True, id="train"), pytest.param(False, id="eval", marks=pytest.mark.slow)]


@pytest.mark.parametrize("train", TRAIN_EVAL)
def test_p2_dense_equivalence(zoo, impl, train):
    """With every patch visible the sparse encoder is the original model: features, gradients,
    running statistics."""
    case, enc, chans = zoo
    x = inputs(enc, chans, case.grid)
    full = MaskPyramid(torch.ones(2, 1, *case.grid, dtype=torch.bool), keep=math.prod(case.grid))
    (fd, gd, bd), (fs, gs, bs) = projected_run(enc, x, None, train), projected_run(enc, x, full, train, impl)
    for a, b in zip(fd, fs):
        torch.testing.assert_close(b, a, **TOL)
    assert_grads_close(gs, gd, enc.model, train, noise_only=True)
    for k in bd:
        torch.testing.assert_close(bs[k], bd[k], **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")


def test_isolation_sparse_not_zero_out(zoo, impl):
    """Sparse semantics: a sample with one visible patch is encoded exactly like that patch alone
    (cropped, dense), in training mode with batch statistics, including the running statistics.
    Zero-out masking fails this (masked zeros are convolved into the patch)."""
    case, enc, chans = zoo
    if case.no_isolation:
        pytest.skip(case.no_isolation)
    where = ISOLATED[case.grid]
    x = inputs(enc, chans, case.grid, batch=len(where), seed=3)
    v = torch.zeros(len(where), 1, *case.grid, dtype=torch.bool)
    for b, at in enumerate(where):
        v[(b, 0, *at)] = True

    def crop(t, b, at, f):
        return t[(b, slice(None), *[slice(i * s, (i + 1) * s) for i, s in zip(at, f)])]

    crops = torch.stack([crop(x, b, at, enc.patch_size) for b, at in enumerate(where)])
    e_sparse = fresh(enc).train()  # (each copy resets the RNG: stochastic depth draws alike)
    with e_sparse.using(impl):
        sparse = e_sparse(x, MaskPyramid(v, keep=1))
    e_dense = fresh(enc).train()
    dense = e_dense(crops)
    for factor, fs, fd in zip(enc.factors, sparse, dense):
        for b, at in enumerate(where):
            torch.testing.assert_close(crop(fs, b, at, factor), fd[b], **TOL)
    bs, bd = buffers(e_sparse), buffers(e_dense)
    for k in bs:
        torch.testing.assert_close(bs[k], bd[k], **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")


def assert_fast_equals_reference(enc, x, masks, train):
    ff, lf, gf, bf, held = run_in_form(enc, "fast", x, masks, train)
    fr, lr, gr, br, _ = run_in_form(enc, "reference", x, masks, train)
    assert held, "the fast form fell back to dense maps"
    for a, b in zip(ff, fr):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=0)
    assert_grads_close(gf, gr, enc.model, train)
    for k in br:
        torch.testing.assert_close(bf[k], br[k], **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")


@pytest.mark.parametrize("train", TRAIN_EVAL)
def test_fast_equals_reference(zoo, train):
    """The fast form (visible tiles only, with halos across patch borders) gives the reference
    form's (dense, then mask) features, loss, gradients and running statistics, on a non-square
    input, and really holds the maps as tiles, for every zoo model. (Batch 4 with half the patches
    visible, so batch statistics at the coarsest stride come from 12 sites: with 4, some models'
    train-mode gradients reach 1e7 and float64 summation order alone moves them by 2e-10.)"""
    case, enc, chans = zoo
    x, masks = inputs(enc, chans, case.grid, batch=4, seed=4), masks_for(case.grid, batch=4, seed=5, ratio=0.5)
    assert_fast_equals_reference(enc, x, masks, train)


def _image(name: str) -> Case:
    return Case(f"timm-{name}", "timm", name, IMAGE_GRID, (32, 32))


BY_ID = {c.id: c for c in CASES}
ON_DEVICES = [(_image("resnet18"), "cuda"), (_image("convnext_atto"), "cuda"), (_image("convnext_atto"), "other"),
              (_image("efficientnet_b0"), "other"), (_image("mobilenetv3_large_100"), "cuda"),
              (BY_ID["3d-custom"], "cuda"), (BY_ID["3d-monai-resnet10"], "cuda")]
# 35-50 s each on a busy 2-core machine; ConvNeXt's depthwise layers hold the kernel choices by default
ON_DEVICES_SLOW = {("timm-efficientnet_b0", "other"), ("timm-mobilenetv3_large_100", "cuda")}


@pytest.mark.parametrize("case,device", [pytest.param(c, d, id=f"{c.id}-{d}",
                                                      marks=[pytest.mark.slow] if (c.id, d) in ON_DEVICES_SLOW else [])
                                         for c, d in ON_DEVICES])
def test_fast_with_the_kernel_choices_of_a_gpu_equals_reference(case, device, monkeypatch):
    """The fast form picks some layer kernels by device type (on CPU: depthwise layers on image
    tiles smaller than 4 x 4 on the canvas, one-site convolutions as im2col products). With the
    choices a CUDA device makes (depthwise layers on the canvas below 16 x 16, convolution
    everywhere) and those of other devices (halo and convolution everywhere), run here on the
    CPU, it still equals the reference form."""
    from sparkmim.sparse import fast

    below = {"cpu": fast.CANVAS_DEPTHWISE_BELOW["cuda"]} if device == "cuda" else {}
    monkeypatch.setattr(fast, "CANVAS_DEPTHWISE_BELOW", below)
    monkeypatch.setattr(fast, "IM2COL_ONE_SITE", frozenset())
    model, chans, names = case.build()
    enc = SparseEncoder(model, feature_modules=names)
    x, masks = inputs(enc, chans, case.grid, batch=4, seed=4), masks_for(case.grid, batch=4, seed=5, ratio=0.5)
    for train in (True, False):
        assert_fast_equals_reference(enc, x, masks, train)


def test_fast_form_keeps_every_tensor_on_the_input_device(zoo):
    """The fast form's forward and backward on the ``meta`` device: a tensor created on the CPU
    (an index, a canvas, a constant) meets the meta inputs and fails as it would on a GPU, and a
    value read by the host fails too (meta tensors hold no data). So the fast form runs on any
    device and never waits for one, for every zoo model."""
    case, enc, chans = zoo
    v = random_visible(2, case.grid, 0.6, generator=torch.Generator().manual_seed(0))
    assert_fast_form_stays_on_the_meta_device(enc, inputs(enc, chans, case.grid), v, case.id)


def test_p3_weight_identity_and_strict_export(zoo, tmp_path):
    """The encoder's state dict has the original model's keys and shapes; weights trained one step
    and exported load strictly into a freshly built original model, equal to the trained ones."""
    case, enc, chans = zoo
    reference, _, _ = case.build()
    own, ref = enc.model.state_dict(), reference.state_dict()
    assert list(own) == list(ref) and all(own[k].shape == ref[k].shape for k in own)
    e = fresh(enc).train()
    opt = torch.optim.SGD(e.parameters(), lr=0.1)
    sum(f.mean() for f in e(inputs(enc, chans, case.grid), masks_for(case.grid))).backward()
    opt.step()
    path = save_encoder_weights(e, tmp_path / "encoder.safetensors")
    target, _, _ = case.build()
    target = target.float()
    report = load_encoder_weights(target, path, strict=True)
    assert not report["missing"] and not report["unexpected"] and not report["shape_mismatch"]
    changed = 0
    for k, v in target.state_dict().items():
        assert torch.equal(v, e.model.state_dict()[k].to(v.dtype)), k
        changed += not torch.equal(v, reference.state_dict()[k].to(v.dtype))
    assert changed > 0, "the exported weights are the fresh ones"
