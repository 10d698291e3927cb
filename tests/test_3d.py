"""SparK in 3-D (volumes, clips): the whole model against an independent write-out of 3-D densify,
decoder and loss (P4), masks and reconstructions of volumes, 3-D patches, refusals and errors.

The properties of the sparse encoder itself (P1, isolation, P2, P3, fast == reference, the meta
device) run over one zoo of 2-D and 3-D models in ``test_properties.py``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import loss_and_gradients
from nets3d import Custom3d
from sparkmim import MaskPyramid, SparK, SparseEncoder, random_visible
from sparkmim.loss import patchify, unpatchify
from sparkmim.masking import grid_of
from sparkmim.sparse import SparseSemanticsError

GRID = (2, 2, 3)  # patches along depth (or time), height, width


@pytest.fixture(params=["fast", "reference"])
def impl(request):
    return request.param


def volumes(enc, chans, batch=2, seed=0, grid=GRID):
    sizes = [g * p for g, p in zip(grid, enc.patch_size)]
    return torch.randn(batch, chans, *sizes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def masks_for(batch=2, seed=0, grid=GRID):
    v = random_visible(batch, grid, 0.6, generator=torch.Generator().manual_seed(seed))
    return MaskPyramid(v, keep=int(v[0].sum()))


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
    assert model.patch_size == (8, 16, 16) and model.levels == [0, 1, 2, 3]
    assert [b.up.stride for b in model.decoder.blocks] == [(2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
    x = volumes(model.encoder, 1, batch=3, seed=1)
    m = masks_for(batch=3, seed=2)
    with model.encoder.using(impl):
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


def test_channels_last_3d_changes_no_number(impl):
    """``--channels-last true`` on volumes: the model and the volumes in ``channels_last_3d``
    give the contiguous run's loss and gradients (float64), in both sparse forms."""
    x = volumes(SparseEncoder(Custom3d()), 1, batch=3, seed=1)
    m = masks_for(batch=3, seed=2)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        model = tiny_spark().train().to(memory_format=fmt)
        with model.encoder.using(impl):
            results.append(loss_and_gradients(model, lambda model=model, fmt=fmt: model(x.contiguous(memory_format=fmt), m).loss))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-12, msg=lambda s, k=k: f"{k}: {s}")


# the product's MONAI networks at narrow widths (constructor arguments), and the strides of their
# feature maps from each architecture's definition: a U-Net's stage at the input's resolution
# (SegResNet's first down layer, DynUNet's input block) is not among them
_NARROW_MONAI = {
    "resnet10": (dict(widen_factor=0.125, conv1_t_size=3), [(2,) * 3, (4,) * 3, (8,) * 3, (16,) * 3]),
    "segresnet": (dict(init_filters=8), [(2,) * 3, (4,) * 3, (8,) * 3]),
    "dynunet": (dict(filters=[4, 8, 8, 16, 16]), [(2,) * 3, (4,) * 3, (8,) * 3, (16,) * 3]),
}


@pytest.mark.parametrize("name", list(_NARROW_MONAI))
def test_each_monai_network_builds_spark_and_feeds_every_map_to_the_decoder(name):
    pytest.importorskip("monai")
    from sparkmim.backbones import TESTED_MONAI, create_backbone, feature_modules_for

    assert name in TESTED_MONAI
    kwargs, strides = _NARROW_MONAI[name]
    torch.manual_seed(0)
    backbone = create_backbone(f"monai:{name}", in_chans=1, **kwargs)
    model = SparK(SparseEncoder(backbone, feature_modules_for(f"monai:{name}")), decoder_width=16)
    assert list(model.encoder.strides) == strides
    assert sorted(model.levels) == list(range(len(strides)))  # every map has its decoder level
    side = 2 * strides[-1][0]
    loss = model(torch.randn(2, 1, side, side, side), generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.densify.parameters() if p.requires_grad)


def test_a_feature_module_at_the_input_resolution_is_refused_naming_it():
    pytest.importorskip("monai")
    from sparkmim.backbones import create_backbone

    backbone = create_backbone("monai:segresnet", in_chans=1, init_filters=8)
    with pytest.raises(ValueError, match=r"feature module 'down_layers.0' is at the input's resolution"):
        SparseEncoder(backbone, [f"down_layers.{i}" for i in range(4)])
