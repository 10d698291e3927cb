"""SparK in 3-D (volumes, clips): the correctness properties over a zoo of 3-D convnets.

P1 no leakage, isolation (sparse, not zero-out), P2 dense equivalence (train and eval), P3 strict
export, P4 the whole model against an independent write-out of 3-D densify, decoder and loss.
Float64, non-cubic inputs, anisotropic patches (a clip model strides time less than space).
P1, isolation and P2 run in both sparse forms (fast: visible tiles only; reference: dense, then
mask), and the fast form equals the reference form (features, loss, gradients, running statistics).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (
    assert_fast_form_stays_on_the_meta_device,
    buffers,
    fresh,
    loss_and_gradients,
    projected_run,
    run_in_form,
)
from sparkmim import MaskPyramid, SparK, SparseEncoder, random_visible
from sparkmim.backbones import create_backbone, feature_modules_for
from sparkmim.checkpoint import load_encoder_weights, save_encoder_weights
from sparkmim.loss import patchify, unpatchify
from sparkmim.masking import grid_of
from sparkmim.sparse import SparseSemanticsError

TOL = dict(rtol=1e-9, atol=1e-9)
GRID = (2, 2, 3)  # patches along depth (or time), height, width


class _SE(nn.Module):
    """Squeeze-excitation: a gate from the mean over the visible sites."""

    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv3d(c, c // 2, 1), nn.Conv3d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool3d(x, 1)))))


class Custom3d(nn.Module):
    """A custom 3-D convnet: anisotropic stem (stride 1 in depth) with InstanceNorm3d, max
    pooling, a residual block with BatchNorm3d, GroupNorm with a squeeze-excitation gate and a
    grouped dilated convolution, average pooling that leaves padding out of the mean."""

    def __init__(self, c=8, in_chans=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_chans, c, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)),
                                  nn.InstanceNorm3d(c, affine=True), nn.ReLU())
        self.pool = nn.MaxPool3d(3, stride=2, padding=1)
        self.conv1 = nn.Sequential(nn.Conv3d(c, c, 3, padding=1, bias=False), nn.BatchNorm3d(c), nn.ReLU(),
                                   nn.Conv3d(c, c, 3, padding=2, dilation=2, groups=2, bias=False), nn.BatchNorm3d(c))
        self.layer2 = nn.Sequential(nn.Conv3d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * c), nn.GELU(),
                                    _SE(2 * c))
        self.layer3 = nn.Sequential(nn.Conv3d(2 * c, 4 * c, 3, stride=2, padding=1), nn.BatchNorm3d(4 * c), nn.ReLU())
        self.smooth = nn.AvgPool3d((1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
        self.head = nn.Linear(4 * c, 2)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.smooth(F.relu(x + self.conv1(x)))
        x = self.layer3(self.layer2(x))
        return self.head(x.mean((2, 3, 4)))


class _Block3d(nn.Module):
    """A ConvNeXt-style block: depthwise 3x3x3, then channels-last LayerNorm, Linear, GELU, Linear,
    layer scale, residual."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv3d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 4, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 4, 1, 2, 3)


class Next3d(nn.Module):
    """A custom 3-D net of the other family: patchify stem (2, 4, 4) with a one-group GroupNorm,
    ConvNeXt-style blocks, stride-2 downsampling, and at stride (4, 8, 8) a branch that pools by
    2, comes back up with a transposed convolution plus nearest interpolation, and is added."""

    def __init__(self, c=8, in_chans=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_chans, c, (2, 4, 4), stride=(2, 4, 4)), nn.GroupNorm(1, c))
        self.stage1 = _Block3d(c)
        self.down2 = nn.Conv3d(c, 2 * c, 2, stride=2)
        self.stage2 = _Block3d(2 * c)
        self.up = nn.ConvTranspose3d(2 * c, 2 * c, 2, stride=2)
        self.down3 = nn.Conv3d(2 * c, 4 * c, 2, stride=2)
        self.stage3 = _Block3d(4 * c)

    def forward(self, x):
        x = self.stage1(self.stem(x))
        x = self.stage2(self.down2(x))
        pooled = F.avg_pool3d(x, 2)
        x = x + self.up(pooled) + F.interpolate(pooled, scale_factor=2, mode="nearest")
        return self.stage3(self.down3(x))


def _monai():
    return pytest.importorskip("monai.networks.nets")


def build(name):
    """(model, in_chans, feature_modules) for a zoo entry, float64, seeded."""
    torch.manual_seed(0)
    if name == "custom":
        return Custom3d().double(), 1, None
    if name == "custom-next":
        return Next3d().double(), 1, ["stage1", "stage2", "stage3"]
    if name == "monai-resnet10":
        nets = _monai()
        m = nets.ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64], spatial_dims=3,
                        n_input_channels=1, num_classes=2)
        return m.double(), 1, None
    if name == "monai-dynunet":
        nets = _monai()
        m = nets.DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2],
                         upsample_kernel_size=[2] * 4, filters=[8, 16, 32, 64, 128], norm_name="instance")
        return m.double(), 1, feature_modules_for("monai:dynunet")
    if name == "monai-segresnet":
        nets = _monai()
        m = nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1, 1, 1))
        return m.double(), 1, [f"down_layers.{i}" for i in range(4)]
    if name.startswith("monai:"):  # as the command line builds it
        return create_backbone(name, in_chans=1).double(), 1, feature_modules_for(name)
    return create_backbone(f"torchvision:{name}").double(), 3, None


ZOO = ["custom", "custom-next", "monai-resnet10", "monai-segresnet", "monai-dynunet",
       pytest.param("mc3_18", marks=pytest.mark.slow), pytest.param("r3d_18", marks=pytest.mark.slow),
       pytest.param("r2plus1d_18", marks=pytest.mark.slow), pytest.param("s3d", marks=pytest.mark.slow),
       pytest.param("monai:resnet50", marks=pytest.mark.slow), pytest.param("monai:densenet121", marks=pytest.mark.slow)]
PATCHES = {"custom": (8, 16, 16), "custom-next": (8, 16, 16), "monai-resnet10": (16, 16, 16), "monai-segresnet": (8, 8, 8),
           "monai-dynunet": (16, 16, 16),
           "mc3_18": (1, 16, 16), "r3d_18": (8, 16, 16), "r2plus1d_18": (8, 16, 16), "s3d": (8, 32, 32),
           "monai:resnet50": (16, 16, 16), "monai:densenet121": (32, 32, 32)}


@pytest.fixture(scope="module", params=ZOO)
def zoo(request):
    model, chans, names = build(request.param)
    return request.param, SparseEncoder(model, feature_modules=names), chans


@pytest.fixture(params=["fast", "reference"])
def impl(request):
    return request.param


def in_form(enc, impl):
    """A copy of ``enc`` computing in the sparse form ``impl``."""
    e = fresh(enc)
    e.sparse_impl = impl
    return e


def volumes(enc, chans, batch=2, seed=0, grid=GRID):
    sizes = [g * p for g, p in zip(grid, enc.patch_size)]
    return torch.randn(batch, chans, *sizes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def masks_for(batch=2, seed=0, grid=GRID):
    v = random_visible(batch, grid, 0.6, generator=torch.Generator().manual_seed(seed))
    return MaskPyramid(v, keep=int(v[0].sum()))


def test_strides_patch_and_feature_sizes(zoo):
    name, enc, chans = zoo
    assert enc.spatial_dims == 3 and enc.sparse_impl == "fast", f"{name}: the build-time check fell back to the reference form"
    assert enc.patch_size == PATCHES[name]
    assert len(enc.strides) == {"monai:densenet121": 5, "monai-dynunet": 5, "custom-next": 3}.get(name, 4)
    x = volumes(enc, chans)
    feats = enc(x)
    assert [f.shape[1] for f in feats] == list(enc.channels)
    for f, s in zip(feats, enc.strides):
        assert tuple(f.shape[2:]) == tuple(a // b for a, b in zip(x.shape[2:], s))


def test_p1_no_leakage(zoo, impl):
    """Changing masked voxels changes no feature, running statistic or gradient; masked sites
    of every feature map are exactly zero."""
    _, enc, chans = zoo
    enc = in_form(enc, impl)
    masks = masks_for()
    x1 = volumes(enc, chans, seed=1)
    x2 = torch.where(masks.at(enc.patch_size), x1, 50 * volumes(enc, chans, seed=2))
    outs = []
    for x in (x1, x2):
        e = fresh(enc).train()
        feats = e(x, masks)
        sum(f.square().sum() for f in feats).backward()
        outs.append((feats, buffers(e), {k: p.grad for k, p in e.model.named_parameters() if p.grad is not None}))
    (f1, b1, g1), (f2, b2, g2) = outs
    for s, a, b in zip(enc.strides, f1, f2):
        visible = masks.at(enc.factor_of_stride(s))
        assert torch.equal(a, b)
        assert (a.abs() * ~visible).sum() == 0, "masked sites must be empty"
        assert (a.abs() * visible).sum() > 0
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)
    assert len(g1) > 0 and g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_p2_dense_equivalence(zoo, train, impl):
    """With every patch visible the sparse encoder is the original 3-D model: features,
    gradients and running statistics."""
    _, enc, chans = zoo
    enc = in_form(enc, impl)
    x = volumes(enc, chans)
    full = MaskPyramid(torch.ones(2, 1, *GRID, dtype=torch.bool), keep=math.prod(GRID))
    (fd, gd, bd), (fs, gs, bs) = projected_run(enc, x, None, train), projected_run(enc, x, full, train)
    for a, b in zip(fd, fs):
        torch.testing.assert_close(b, a, **TOL)
    assert gd.keys() == gs.keys() and len(gd) > 0
    cancelled = _biases_before_batch_norm(enc.model) if train else {}
    for k in gd:
        if k in cancelled:  # zero in exact arithmetic: both forms give rounding noise only
            scale = gd[cancelled[k]].norm()
            assert gd[k].norm() <= 1e-12 * scale and gs[k].norm() <= 1e-12 * scale, k
            continue
        assert (gs[k] - gd[k]).norm() <= 1e-10 * gd[k].norm() + 1e-10, k
    for k in bd:
        torch.testing.assert_close(bs[k], bd[k], **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")


def _biases_before_batch_norm(model) -> dict[str, str]:
    """``{bias: weight}`` of the convolutions whose output goes straight into a batch norm (the
    next module of the same ``Sequential``, e.g. MONAI's ``downsample``): in training the norm
    removes any constant per channel, so the bias gradient is zero in exact arithmetic."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            for (i, a), (_, b) in zip(list(m.named_children())[:-1], list(m.named_children())[1:]):
                if isinstance(a, nn.Conv3d) and a.bias is not None and isinstance(b, nn.modules.batchnorm._BatchNorm):
                    prefix = f"{name}.{i}." if name else f"{i}."
                    found[prefix + "bias"] = prefix + "weight"
    return found


def test_isolation_sparse_not_zero_out(zoo, impl):
    """A sample with one visible patch is encoded exactly like that patch alone (cropped, run
    densely), in training mode with batch statistics, running statistics included."""
    name, enc, chans = zoo
    enc = in_form(enc, impl)
    if name == "monai-dynunet":
        pytest.skip("the crop of one patch is a single site at the coarsest map, where PyTorch refuses an "
                    "instance norm in training ('Expected more than 1 spatial element'): no dense reference")
    where = [(0, 0, 2), (1, 1, 1), (0, 1, 0), (1, 0, 2), (0, 0, 1), (1, 1, 0)]
    x = volumes(enc, chans, batch=len(where), seed=3)
    v = torch.zeros(len(where), 1, *GRID, dtype=torch.bool)
    for b, at in enumerate(where):
        v[(b, 0, *at)] = True
    P = enc.patch_size

    def crop(t, b, at, f):
        return t[(b, slice(None), *[slice(i * s, (i + 1) * s) for i, s in zip(at, f)])]

    crops = torch.stack([crop(x, b, at, P) for b, at in enumerate(where)])
    e_sparse, e_dense = fresh(enc).train(), fresh(enc).train()
    sparse, dense = e_sparse(x, MaskPyramid(v, keep=1)), e_dense(crops)
    for s, fs, fd in zip(enc.strides, sparse, dense):
        f = enc.factor_of_stride(s)
        for b, at in enumerate(where):
            torch.testing.assert_close(crop(fs, b, at, f), fd[b], **TOL)
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
    assert gf.keys() == gr.keys() and len(gr) > 0
    cancelled = _biases_before_batch_norm(enc.model) if train else {}
    for k in gr:
        scale = gr[cancelled.get(k, k)].norm()  # a bias cancelled by a batch norm: noise on either side
        assert (gf[k] - gr[k]).norm() <= 1e-10 * scale + 1e-10, k
    for k in br:
        torch.testing.assert_close(bf[k], br[k], **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fast_equals_reference(zoo, train):
    """The fast form (visible tiles only, with halos across patch borders) gives the reference
    form's features, loss, gradients and running statistics, on a non-cubic volume with half
    the patches visible, and it really holds the maps as tiles."""
    _, enc, chans = zoo
    assert_fast_equals_reference(enc, volumes(enc, chans, batch=3, seed=4), masks_for(batch=3, seed=5), train)


@pytest.mark.parametrize("name", ["custom", "monai-resnet10"])
def test_fast_with_the_kernel_choices_of_a_gpu_equals_reference(name, monkeypatch):
    """On CPU a convolution with one output site per tile is one matrix product (im2col); with
    the convolution kernel everywhere, as on a GPU, the fast form still equals the reference."""
    from sparkmim.sparse import fast

    monkeypatch.setattr(fast, "IM2COL_ONE_SITE", frozenset())
    model, chans, names = build(name)
    enc = SparseEncoder(model, feature_modules=names)
    for train in (True, False):
        assert_fast_equals_reference(enc, volumes(enc, chans, batch=3, seed=4), masks_for(batch=3, seed=5), train)


def test_fast_form_keeps_every_tensor_on_the_input_device(zoo):
    """Forward and backward of the fast form on the ``meta`` device: a tensor made on the CPU, or
    a value read by the host, would fail here as it would on a GPU."""
    name, enc, chans = zoo
    v = random_visible(2, GRID, 0.6, generator=torch.Generator().manual_seed(0))
    assert_fast_form_stays_on_the_meta_device(enc, volumes(enc, chans), v, name)


def test_p3_weight_identity_and_strict_export(zoo, tmp_path):
    name, enc, chans = zoo
    reference, _, _ = build(name)
    own, ref = enc.model.state_dict(), reference.state_dict()
    assert list(own) == list(ref) and all(own[k].shape == ref[k].shape for k in own)
    e = fresh(enc).train()
    opt = torch.optim.SGD(e.parameters(), lr=0.1)
    sum(f.mean() for f in e(volumes(enc, chans), masks_for())).backward()
    opt.step()
    path = save_encoder_weights(e, tmp_path / "encoder.safetensors")
    target, _, _ = build(name)
    target = target.float()
    report = load_encoder_weights(target, path, strict=True)
    assert not report["missing"] and not report["unexpected"] and not report["shape_mismatch"]
    changed = 0
    for k, v in target.state_dict().items():
        assert torch.equal(v, e.model.state_dict()[k].to(v.dtype)), k
        changed += not torch.equal(v, reference.state_dict()[k].to(v.dtype))
    assert changed > 0, "the exported weights are the fresh ones"


# -- the whole model -----------------------------------------------------------------------------------
def tiny_spark():
    torch.manual_seed(0)
    return SparK(SparseEncoder(Custom3d()), decoder_width=64).double()


def _bn_train(x, w, b, eps):
    return F.batch_norm(x, None, None, w, b, True, 0.0, eps)


def _repeat(mask, factors):
    for axis, f in enumerate(factors):
        mask = mask.repeat_interleave(f, 2 + axis)
    return mask


def written_out_loss(model, x, visible):
    """Densify (sparse BN over visible sites, mask token, projection), the 3-D light decoder
    (transposed convolution doubling the axes whose patch size is not yet reached, two 3x3x3
    conv-BN layers) and the per-patch normalised L2 over masked patches, from the parameters."""
    P = model.patch_size
    feats = model.encoder(x, visible)[::-1]
    h = None
    cur = visible.clone()
    level_of = dict(zip(model.levels, range(len(model.levels))))
    for i, blk in enumerate(model.decoder.blocks):
        if i in level_of:
            f, d = feats[level_of[i]], model.densify[level_of[i]]
            rows = f.movedim(1, -1)[cur[:, 0]]
            mean, var = rows.mean(0), rows.var(0, unbiased=False)
            shape = (1, -1, 1, 1, 1)
            normed = (f - mean.view(shape)) / torch.sqrt(var.view(shape) + d.norm.eps)
            normed = normed * d.norm.weight.view(shape) + d.norm.bias.view(shape)
            dense = torch.where(cur, normed, d.mask_token)
            if not isinstance(d.proj, nn.Identity):
                dense = F.conv3d(dense, d.proj.weight, d.proj.bias, padding=d.proj.padding)
            h = dense if h is None else h + dense
        doubled = [2 if 2**i < p else 1 for p in P]
        kernel = [4 if u == 2 else 3 for u in doubled]
        assert tuple(blk.up.weight.shape[2:]) == tuple(kernel)
        h = F.conv_transpose3d(h, blk.up.weight, blk.up.bias, stride=doubled, padding=1)
        c1, n1, _, c2, n2 = blk.conv
        h = F.relu6(_bn_train(F.conv3d(h, c1.weight, padding=1), n1.weight, n1.bias, n1.eps))
        h = _bn_train(F.conv3d(h, c2.weight, padding=1), n2.weight, n2.bias, n2.eps)
        cur = _repeat(cur, doubled)
    pred = F.conv3d(h, model.decoder.head.weight, model.decoder.head.bias)

    def patches(t):  # (B, L, C * prod(P)) by unfolding each axis (C-major order within a patch)
        for axis, p in enumerate(P):
            t = t.unfold(2 + axis, p, p)
        b, c = t.shape[:2]
        return t.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b, -1, c * math.prod(P))

    target = patches(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((patches(pred) - target) ** 2).mean(-1)
    return per_patch[~visible.flatten(1)].mean()


def test_p4_loss_and_gradients_match_a_written_out_3d_model(impl):
    model = tiny_spark().train()
    model.encoder.sparse_impl = impl
    assert model.patch_size == (8, 16, 16) and model.levels == [0, 1, 2, 3]
    assert [b.up.stride for b in model.decoder.blocks] == [(2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
    x = volumes(model.encoder, 1, batch=3, seed=1)
    m = masks_for(batch=3, seed=2)
    (l0, g0), (l1, g1) = (loss_and_gradients(model, lambda: written_out_loss(model, x, m.visible)),
                          loss_and_gradients(model, lambda: model(x, m).loss))
    losses, grads = [l0, l1], [g0, g1]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-12)
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("encoder.") for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-8, atol=1e-10, msg=lambda s, k=k: f"{k}: {s}")


def test_model_draws_masks_and_reconstructs_volumes():
    model = tiny_spark()
    x = volumes(model.encoder, 1, batch=2, seed=4)
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert out.visible.shape == (2, 1, *GRID) and out.prediction.shape == x.shape
    assert int(out.visible[0].sum()) == int(out.visible[1].sum()) == round(math.prod(GRID) * 0.4)
    rec = model.reconstruct(x, out.visible)
    full = out.visible
    for axis, p in enumerate(model.patch_size):
        full = full.repeat_interleave(p, 2 + axis)
    assert torch.equal(rec.masked, torch.where(full, x, 0.0))
    assert torch.equal(rec.reconstruction[full.expand_as(x)], x[full.expand_as(x)])
    assert not torch.equal(rec.reconstruction, x)


def test_patchify_3d_is_row_major_over_patches():
    x = torch.arange(2 * 2 * 4 * 8 * 12, dtype=torch.float64).view(2, 2, 4, 8, 12)
    p = patchify(x, (2, 4, 4))
    assert p.shape == (2, 12, 2 * 2 * 4 * 4)
    # patch 5 of a (2, 2, 3) grid is depth 0, row 1, column 2; its values come channel-last
    torch.testing.assert_close(p[1, 5].view(2, 4, 4, 2).permute(3, 0, 1, 2), x[1, :, 0:2, 4:8, 8:12])
    assert torch.equal(unpatchify(p, (2, 4, 4), (2, 2, 3), 2), x)


class _TokenAttention(nn.Module):
    """Self-attention over the tokens of a (B, C, D, H, W) map."""

    def __init__(self, c):
        super().__init__()
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        return self.attn(t, t, t, need_weights=False)[0].mean(1)


class _Tokens3d(nn.Module):
    """A patch-embedding stem, then a transformer over its tokens (``wide``) or a small
    attention-pooling head on a convolutional trunk."""

    def __init__(self, wide: bool):
        super().__init__()
        c = 64 if wide else 8
        self.stem = nn.Conv3d(1, c, (2, 4, 4), stride=(2, 4, 4))
        self.trunk = nn.Identity() if wide else nn.Sequential(nn.Conv3d(c, 64, 3, stride=2, padding=1), nn.ReLU(),
                                                              nn.Conv3d(64, 64, 3, stride=2, padding=1))
        self.head = _TokenAttention(64 if wide else 8) if wide else nn.Sequential(nn.Conv3d(64, 8, 1),
                                                                                  _TokenAttention(8))

    def forward(self, x):
        return self.head(self.trunk(self.stem(x)))


def test_a_transformer_after_a_patch_embedding_is_refused_and_an_attention_head_is_not():
    """Feature discovery sees only the stem of a transformer (its tokens are no feature map):
    the encoder refuses it, naming the attention layer, instead of pre-training the stem alone.
    A convolutional trunk with a small attention head builds (the head is left out)."""
    with pytest.raises(SparseSemanticsError, match=r"self-attention or windowed layers after its last feature map "
                                                   r"on the mask grid \('head', _TokenAttention"):
        SparseEncoder(_Tokens3d(wide=True))
    enc = SparseEncoder(_Tokens3d(wide=False))
    assert enc.strides == ((2, 4, 4), (4, 8, 8), (8, 16, 16))
    assert any(n.startswith("head.") for n in enc.unused_parameters)


def test_3d_inputs_with_a_bad_size_are_clear_errors():
    enc = SparseEncoder(Custom3d())
    with pytest.raises(ValueError, match=r"10x32x48 is not a multiple of the patch size 8x16x16"):
        grid_of((10, 32, 48), enc.patch_size)
    with pytest.raises(ValueError, match=r"volumes or clips of shape \(B, 1, D, H, W\)"):
        enc(torch.randn(2, 1, 32, 48))
    with pytest.raises(ValueError, match="does not match"):
        enc(torch.randn(2, 1, 16, 32, 48), torch.ones(2, 1, 2, 2, 2, dtype=torch.bool))
