"""Layer-level sparse semantics, checked against hand computations on small custom models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparkmim import MaskPyramid, SparseEncoder, SparseSemanticsError
from sparkmim.sparse import to_dense

P = 8


@pytest.fixture(params=["fast", "reference"])
def encoder(request):
    """Every layer-level check runs on both implementations of the sparse semantics: a builder of
    encoders of ``model`` (features "a" and "b") in the form of this run, which it really uses."""

    def build(model, **kw):
        kw.setdefault("sparse_impl", request.param)
        enc = SparseEncoder(model.double(), ["a", "b"], probe_size=32, **kw)
        assert enc.sparse_impl == kw["sparse_impl"], "the build-time check fell back to the reference form"
        return enc

    return build


class Tiny(nn.Module):
    """stem (stride 2) -> stage a (stride 4) -> stage b (stride 8); configurable middle layer."""

    def __init__(self, middle: nn.Module | None = None, norm=nn.BatchNorm2d):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), norm(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), norm(8), nn.ReLU(), middle or nn.Identity())
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), norm(16))

    def forward(self, x):
        return self.b(self.a(self.stem(x)))


def batch(seed=0, b=2, grid=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, grid[0] * P, grid[1] * P, generator=g, dtype=torch.float64)
    v = torch.zeros(b, 1, *grid, dtype=torch.bool)
    v[0, 0, 0, 0] = v[0, 0, 1, 2] = v[1, 0, 0, 1] = v[1, 0, 1, 1] = True
    return x, MaskPyramid(v, keep=2)


def capture_input(module):
    seen = {}
    module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", to_dense(a[0]).detach().clone()))
    return seen


def test_feature_modules_and_strides_for_a_custom_model(encoder):
    enc = encoder(Tiny())
    assert enc.strides == ((4, 4), (8, 8)) and enc.channels == (8, 16) and enc.patch_size == (8, 8)
    assert enc.factors == ((2, 2), (1, 1))


def test_batch_norm_statistics_from_visible_sites_only(encoder):
    enc = encoder(Tiny()).train()
    bn = enc.model.a[1]
    seen = capture_input(bn)
    x, m = batch()
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    out = enc(x, m)[0]
    inp = seen["x"]  # conv output, already zero at masked sites
    vis = m.at(2)[:, 0]
    rows = inp.permute(0, 2, 3, 1)[vis]  # (N_visible, C)
    mean, var_b, var_u = rows.mean(0), rows.var(0, unbiased=False), rows.var(0)
    torch.testing.assert_close(bn.running_mean, 0.9 * rm0 + 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 * rv0 + 0.1 * var_u)
    # stage output = relu(bn(x)) at visible sites, recomputed by hand
    expected = F.relu((inp - mean[:, None, None]) / torch.sqrt(var_b[:, None, None] + bn.eps) * bn.weight[:, None, None]
                      + bn.bias[:, None, None])
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[vis], expected.permute(0, 2, 3, 1)[vis])
    assert out.permute(0, 2, 3, 1)[~vis].abs().sum() == 0


def test_group_norm_statistics_per_sample_over_visible_sites(encoder):
    enc = encoder(Tiny(norm=lambda c: nn.GroupNorm(2, c))).train()
    gn = enc.model.a[1]
    seen = capture_input(gn)
    x, m = batch()
    out = enc(x, m)[0]
    inp, vis = seen["x"], m.at(2)[:, 0]
    for b in range(2):
        for g in range(2):
            vals = inp[b, 4 * g:4 * g + 4].permute(1, 2, 0)[vis[b]]  # (N_visible_b, 4)
            mu, var = vals.mean(), vals.var(unbiased=False)
            want = F.relu((vals - mu) / torch.sqrt(var + gn.eps) * gn.weight[4 * g:4 * g + 4] + gn.bias[4 * g:4 * g + 4])
            torch.testing.assert_close(out[b, 4 * g:4 * g + 4].permute(1, 2, 0)[vis[b]], want)


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


def test_global_pooling_in_blocks_averages_visible_sites_only(encoder):
    enc = encoder(Tiny(middle=SE(8))).eval()
    se = enc.model.a[3]
    seen = capture_input(se)
    gate = {}
    se.fc.register_forward_hook(lambda mod, a, o: gate.__setitem__("in", a[0].detach().clone()))
    x, m = batch()
    enc(x, m)
    vis = m.at(2)
    expected = (seen["x"] * vis).sum((2, 3), keepdim=True) / vis.sum((2, 3), keepdim=True)
    torch.testing.assert_close(gate["in"], expected)


def test_max_pooling_ignores_masked_sites(encoder):
    model = Tiny(middle=nn.MaxPool2d(3, 1, 1))
    enc = encoder(model).eval()
    seen = capture_input(enc.model.a[3])
    out = {}
    enc.model.a[3].register_forward_hook(lambda mod, a, o: out.__setitem__("y", to_dense(o).detach().clone()))
    x, m = batch()
    enc(x, m)
    vis = m.at(2)
    shifted = torch.where(vis, seen["x"] - 100.0, 0.0)  # all visible values negative
    expected = F.max_pool2d(shifted.masked_fill(~vis, float("-inf")), 3, 1, 1) + 100.0
    torch.testing.assert_close(torch.where(vis, out["y"], 0.0),
                               torch.where(vis, expected, 0.0))
    assert out["y"].masked_select(~vis).abs().sum() == 0


class Attention(nn.Module):
    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2)
        a = torch.softmax(t.transpose(1, 2) @ t, dim=-1)
        return (t @ a).view(b, c, h, w)


class Rolled(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=3)


@pytest.mark.parametrize("layer,what", [(Attention(), "flatten"), (Rolled(), "roll")])
def test_unsupported_layers_fail_at_build_time_with_the_module_path(layer, what, encoder):
    with pytest.raises(SparseSemanticsError, match=rf"{what}.*in module 'a\.3' \({type(layer).__name__}\)"):
        encoder(Tiny(middle=layer))


def test_the_wrapped_model_still_works_on_its_own_and_copies_are_independent(encoder):
    model = Tiny().double().eval()
    reference = copy.deepcopy(model)
    enc = encoder(model).eval()
    x, m = batch()
    torch.testing.assert_close(model(x), reference(x))  # hooks are inert outside the encoder
    twin = copy.deepcopy(enc)
    a, b = enc(x, m), twin(x, m)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert enc.model.state_dict().keys() == reference.state_dict().keys()


def test_build_leaves_weights_buffers_and_modes_untouched(encoder):
    model = Tiny().double()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
    before = copy.deepcopy(model.state_dict())
    model.eval()
    encoder(model)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_torch_compile_matches_eager(encoder):
    enc = encoder(Tiny(middle=SE(8))).train()
    x, m = batch()
    eager = copy.deepcopy(enc)
    compiled = torch.compile(enc, backend="eager")
    for a, b in zip(eager(x, m), compiled(x, m)):
        torch.testing.assert_close(a, b)


class LowLevel(nn.Module):
    """The same layers spelled with torch.convolution / torch.batch_norm / torch.group_norm."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, gn: nn.GroupNorm):
        super().__init__()
        self.conv, self.bn, self.gn = conv, bn, gn

    def forward(self, x):
        c = self.conv
        x = torch.convolution(x, c.weight, c.bias, c.stride, c.padding, c.dilation, False, (0, 0), c.groups)
        b = self.bn
        x = torch.batch_norm(x, b.weight, b.bias, b.running_mean, b.running_var, self.training, 0.1, b.eps, False)
        return torch.group_norm(x, self.gn.num_groups, self.gn.weight, self.gn.bias, self.gn.eps, False)


def test_low_level_spellings_have_the_same_sparse_meaning(encoder):
    conv, bn, gn = nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.GroupNorm(2, 8)
    high = Tiny(middle=nn.Sequential(conv, bn, gn))
    low = copy.deepcopy(high)
    low.a[3] = LowLevel(low.a[3][0], low.a[3][1], low.a[3][2])
    x, m = batch()
    a, b = encoder(high).train(), encoder(low).train()
    for p, q in zip(a(x, m), b(x, m)):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(a.model.a[3][1].running_var, b.model.a[3].bn.running_var)


@pytest.mark.parametrize("include_pad", [True, False])
def test_average_pooling_treats_masked_sites_like_padding(include_pad, encoder):
    enc = encoder(Tiny(middle=nn.AvgPool2d(3, 1, 1, count_include_pad=include_pad))).eval()
    seen = capture_input(enc.model.a[3])
    out = {}
    enc.model.a[3].register_forward_hook(lambda mod, a, o: out.__setitem__("y", to_dense(o).detach().clone()))
    x, m = batch()
    enc(x, m)
    vis = m.at(2).to(x.dtype)
    total = F.avg_pool2d(seen["x"] * vis, 3, 1, 1, count_include_pad=True) * 9  # window sums
    count = F.avg_pool2d(vis, 3, 1, 1, count_include_pad=True) * 9 if not include_pad else 9.0
    torch.testing.assert_close(out["y"], torch.where(vis.bool(), total / count, 0.0))


class _Volumes(nn.Module):
    """A 3-D twin of Tiny with a configurable middle layer."""

    def __init__(self, middle: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, 3, 2, 1), nn.InstanceNorm3d(8, affine=True), nn.PReLU())
        self.a = nn.Sequential(nn.Conv3d(8, 8, 3, 2, 1), nn.BatchNorm3d(8), middle)
        self.b = nn.Sequential(nn.Conv3d(8, 16, 3, 2, 1), nn.BatchNorm3d(16))

    def forward(self, x):
        return self.b(self.a(self.stem(x)))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("layer", ["prelu", "prelu-per-channel", "channel-dropout"])
def test_prelu_and_channel_dropout_run_on_tiles_as_the_dense_layer(layer, dims):
    """PReLU (one slope or one per channel) and channel dropout (Dropout2d / Dropout3d) run in the
    fast form without falling back, and give the reference form's features and gradients under
    the same seed: dropout draws one keep-flag per sample and channel, as the dense layer does,
    so a dropped channel is zero at every visible site of its sample."""
    middle = {"prelu": nn.PReLU(), "prelu-per-channel": nn.PReLU(8),
              "channel-dropout": (nn.Dropout2d if dims == 2 else nn.Dropout3d)(0.5)}[layer]
    torch.manual_seed(0)
    model = (Tiny(nn.Sequential(middle, nn.ReLU())) if dims == 2 else _Volumes(middle)).double()
    if layer.startswith("prelu"):
        with torch.no_grad():
            middle.weight.uniform_(-0.5, 0.5)
    x, masks = batch(seed=1)
    if dims == 3:
        x = torch.randn(4, 3, P, 2 * P, 3 * P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        v = torch.zeros(4, 1, 1, 2, 3, dtype=torch.bool)
        for i, at in enumerate([(0, 0, 0), (0, 1, 2), (0, 0, 1), (0, 1, 1)]):
            v[(i, 0, *at)] = v[(i, 0, *[(a + 1) % s for a, s in zip(at, (1, 2, 3))])] = True
        masks = MaskPyramid(v, keep=2)
    enc = SparseEncoder(model, ["a", "b"], probe_size=32)
    assert enc.sparse_impl == "fast"
    seen = capture_input(enc.model.b)
    out = {}
    for impl in ("fast", "reference"):
        e = copy.deepcopy(enc).train()
        torch.manual_seed(7)
        with e.using(impl):
            feats = e(x, masks)
        sum((f * f).sum() for f in feats).backward()
        out[impl] = feats, {k: p.grad for k, p in e.model.named_parameters() if p.grad is not None}, seen["x"]
    (ff, gf, af), (fr, gr, ar) = out["fast"], out["reference"]
    for a, b in zip(ff, fr):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert gf.keys() == gr.keys()
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], rtol=1e-10, atol=1e-12)
    if layer == "channel-dropout":  # the input of stage b: whole channels of a sample are zero, others are not
        visible = masks.at(enc.factors[0])
        per_channel = (af.abs() * visible).flatten(2).sum(2)  # (B, C) over visible sites
        assert bool((per_channel == 0).any()) and bool((per_channel > 0).any())
        torch.testing.assert_close(af, ar, rtol=1e-12, atol=1e-12)
