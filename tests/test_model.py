"""SparK model: parameter counts, faithfulness to the paper's formulation (P4), ablations, channels."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import loss_and_gradients
from sparkmim import MaskPyramid, SparK, SparseEncoder, random_visible


def tiny(name="resnet18", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model_kw = {k: kw.pop(k) for k in list(kw) if k in ("in_chans",)}
    enc = SparseEncoder.from_timm(name, **model_kw)
    kw.setdefault("decoder_width", 128)
    return SparK(enc, **kw).to(dtype)


def masks(batch, grid, seed=0):
    v = random_visible(batch, grid, 0.6, generator=torch.Generator().manual_seed(seed))
    return MaskPyramid(v, keep=int(v[0].sum()))


def test_parameter_count_matches_reference_resnet50():
    model = SparK(SparseEncoder.from_timm("resnet50"))
    n = sum(p.numel() for p in model.parameters())
    assert n == 52_921_835  # 52.92 M, the reference set-up's figure
    assert sum(p.numel() for p in model.encoder.parameters()) == 23_508_032
    assert model.densify_norm == "bn" and len(model.decoder.blocks) == 5
    assert model.decoder.widths == [768, 384, 192, 96, 48, 24]


def test_convnext_defaults():
    model = SparK(SparseEncoder.from_timm("convnext_atto"))
    assert model.densify_norm == "ln"
    assert isinstance(model.densify[0].proj, torch.nn.Conv2d) and model.densify[0].proj.kernel_size == (1, 1)
    assert model.densify[1].proj.kernel_size == (3, 3)


# -- P4: the paper's formulation written out independently ------------------------------------------
def _bn_train(x, w, b, eps):
    return F.batch_norm(x, None, None, w, b, True, 0.0, eps)


def reference_loss(model: SparK, images, visible):
    """Section 3 densify + appendix A decoder + section 3.3 loss, from the model's parameters."""
    P = model.patch_size
    feats = model.encoder(images, visible)[::-1]  # coarsest first
    x = None
    cur = visible.clone()
    for i, blk in enumerate(model.decoder.blocks):
        if i < len(feats):
            f, d = feats[i], model.densify[i]
            # sparse BN: statistics of the visible sites only
            vis = cur.expand(-1, f.shape[1], -1, -1)
            rows = f.permute(0, 2, 3, 1)[cur[:, 0]]  # (N_visible, C)
            mean, var = rows.mean(0), rows.var(0, unbiased=False)
            normed = (f - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + d.norm.eps)
            normed = normed * d.norm.weight[None, :, None, None] + d.norm.bias[None, :, None, None]
            dense = torch.where(vis, normed, d.mask_token.expand_as(normed))
            proj = dense if isinstance(d.proj, torch.nn.Identity) else F.conv2d(
                dense, d.proj.weight, d.proj.bias, padding=d.proj.padding)
            x = proj if x is None else x + proj
        up, c1, n1, _, c2, n2 = blk.up, *blk.conv
        x = F.conv_transpose2d(x, up.weight, up.bias, stride=2, padding=1)
        x = F.relu6(_bn_train(F.conv2d(x, c1.weight, padding=1), n1.weight, n1.bias, n1.eps))
        x = _bn_train(F.conv2d(x, c2.weight, padding=1), n2.weight, n2.bias, n2.eps)
        cur = cur.repeat_interleave(2, 2).repeat_interleave(2, 3)
    pred = F.conv2d(x, model.decoder.head.weight, model.decoder.head.bias)
    # per-patch normalised target, L2 per patch, mean over masked patches (unfold: C-major order)
    t = F.unfold(images, P, stride=P)  # (B, C*P*P, L)
    t = (t - t.mean(1, keepdim=True)) / (t.var(1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((F.unfold(pred, P, stride=P) - t) ** 2).mean(1)  # (B, L)
    masked = ~visible.flatten(1)
    return per_patch[masked].mean()


def test_p4_loss_and_gradients_match_the_paper_formulation():
    model = tiny().train()
    images = torch.randn(3, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = masks(3, (2, 3), seed=2)
    (l0, g0), (l1, g1) = (loss_and_gradients(model, lambda: reference_loss(model, images, m.visible)),
                          loss_and_gradients(model, lambda: model(images, m).loss))
    losses, grads = [l0, l1], [g0, g1]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-12)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-8, atol=1e-10, msg=lambda s, k=k: f"{k}: {s}")


# -- ablation switches ----------------------------------------------------------------------------
def test_single_scale_uses_only_the_coarsest_map():
    h, s = tiny(), tiny(hierarchical=False)
    assert len(s.densify) == 1 and s.levels == [0]
    assert sum(p.numel() for p in s.parameters()) < sum(p.numel() for p in h.parameters())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    m = masks(2, (2, 2))
    inputs = s.forward_densify(s.forward_encoder(x, m), m)
    assert inputs[0] is not None and all(t is None for t in inputs[1:])
    assert torch.isfinite(s(x, m).loss)


def test_zero_out_ablation_is_dense_on_the_masked_image():
    model = tiny(sparse=False)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    m = masks(2, (2, 3))
    dense = model.forward_encoder(x, m)[::-1]
    plain = model.encoder(torch.where(m.at(32), x, 0.0))  # the original model on the zeroed image
    for a, b in zip(dense, plain):
        assert torch.equal(a, b)
    assert (dense[0].abs() * ~m.at(8)).sum() > 0  # masked regions are not kept empty
    assert model.encoder.sparse  # the ablation is the model's: its encoder is left sparse, as built
    assert (model.encoder(x, m)[0].abs() * ~m.at(8)).sum() == 0
    assert torch.isfinite(model(x, m).loss)


def test_pos_embed_and_loss_on_all():
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    m = masks(2, (2, 2))
    base = tiny().train()  # batch statistics: decoder activations of unit scale
    torch.nn.init.normal_(base.decoder.head.weight)  # a prediction far from zero, so losses differ
    ape = tiny(pos_embed=True).train()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ape.load_state_dict(state)
    assert not torch.allclose(base(x, m).prediction, ape(x, m).prediction)
    everywhere = tiny(loss_on="all").train()
    everywhere.load_state_dict(state)
    base.load_state_dict(state)
    b, a = base(x, m), everywhere(x, m)
    torch.testing.assert_close(a.prediction, b.prediction)
    t = F.unfold(x, 32, stride=32)
    t = (t - t.mean(1, keepdim=True)) / (t.var(1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((F.unfold(a.prediction, 32, stride=32) - t) ** 2).mean(1)
    torch.testing.assert_close(a.loss, per_patch.mean())
    torch.testing.assert_close(b.loss, per_patch[~m.visible.flatten(1)].mean())
    assert not torch.allclose(a.loss, b.loss)


@pytest.mark.parametrize("chans", [1, 5])
def test_any_channel_count(chans):
    """With any channel count the decoder predicts every channel and the loss is the paper's
    (each target patch normalised over all its channels and pixels), as written out independently."""
    model = tiny(in_chans=chans)
    x = torch.randn(2, chans, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(chans))
    m = masks(2, (2, 3))
    out = model(x, m)
    assert out.prediction.shape == x.shape
    torch.testing.assert_close(out.loss, reference_loss(model, x, m.visible), rtol=1e-10, atol=0)


def test_reconstruct_pastes_prediction_over_masked_patches():
    model = tiny(dtype=torch.float32).eval()
    x = torch.randn(2, 3, 64, 96)
    m = masks(2, (2, 3))
    r = model.reconstruct(x, m)
    full = m.at(32).expand_as(x)
    assert torch.equal(r.reconstruction[full], x[full])
    assert torch.equal(r.reconstruction[~full], r.prediction[~full])
    assert torch.equal(r.masked[~full], torch.zeros_like(x[~full]))
    # with the image itself as the target (norm_pix False) the prediction is shown as it is
    model.norm_pix = False
    raw = model.reconstruct(x, m)
    out = model(x, m)
    assert torch.equal(raw.prediction, out.prediction) and torch.equal(raw.reconstruction[~full], out.prediction[~full])
    torch.testing.assert_close(out.loss, ((out.prediction - x) ** 2)[~full].mean())


def test_drawn_masks_follow_the_generator_and_ratio():
    model = tiny(dtype=torch.float32)
    x = torch.randn(4, 3, 96, 128)
    a = model(x, generator=torch.Generator().manual_seed(5)).visible
    b = model(x, generator=torch.Generator().manual_seed(5)).visible
    assert torch.equal(a, b) and a.shape == (4, 1, 3, 4)
    assert (a.flatten(1).sum(1) == round(12 * 0.4)).all()
    # with several ranks each takes its rows of the global batch's masks: any world size, same masks
    whole = model.draw_masks(x, torch.Generator().manual_seed(9)).visible
    for rank in range(2):
        part = model.draw_masks(x[:2], torch.Generator().manual_seed(9), rank=rank, world=2).visible
        assert torch.equal(part, whole[rank::2])
    assert (model.draw_masks(x, ratio=0.25).visible.flatten(1).sum(1) == 9).all()


def test_bad_inputs_are_clear_errors():
    model = tiny(dtype=torch.float32)
    with pytest.raises(ValueError, match="not a multiple of the patch size 32"):
        model(torch.randn(2, 3, 70, 64))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="loss_on"):
        SparK(model.encoder, loss_on="visible")


@pytest.mark.parametrize("name", ["resnet18", "convnextv2_atto"])
def test_bf16_autocast_runs_the_sparse_layers(name):
    model = tiny(name, dtype=torch.float32)
    x = torch.randn(2, 3, 64, 96)
    m = masks(2, (2, 3))
    ref = model(x, m).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, m)
    out.loss.backward()
    assert torch.isfinite(out.loss) and abs(out.loss.item() - ref.item()) < 0.05
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("impl", ["fast", pytest.param("reference", marks=pytest.mark.slow)])
def test_maps_keep_the_images_memory_format(impl):
    """Encoder features, densified maps, every decoder convolution's input and every decoder
    block's output gradient are in the images' memory format (contiguous by default,
    channels-last when asked for): the norms, which compute on channels-last rows, do not switch
    the layout on their own. The layout changes no number."""
    x, m = torch.randn(2, 3, 64, 96), masks(2, (2, 3))
    losses = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = tiny("resnet18", dtype=torch.float32, decoder_width=64).to(memory_format=fmt)
        xf = x.contiguous(memory_format=fmt)
        seen = []
        for mod in model.decoder.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                mod.register_forward_hook(lambda _m, a, o, seen=seen: seen.append(a[0]))
        for block in model.decoder.blocks:
            block.register_full_backward_hook(lambda _m, gi, go, seen=seen: seen.append(go[0]))
        with model.encoder.using(impl):
            feats = model.forward_encoder(xf, m)
        dense = model.forward_densify(feats, m)
        loss = model.forward_loss(xf, model.forward_decoder(dense), m.visible)
        loss.backward()
        assert len(seen) == 4 * len(model.decoder.blocks) + 1
        maps = feats + [d for d in dense if d is not None] + seen
        assert all(t.is_contiguous(memory_format=fmt) for t in maps), fmt
        losses[fmt] = loss.detach()
    torch.testing.assert_close(losses[torch.channels_last], losses[torch.contiguous_format])


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", pytest.param("efficientnet_b0", marks=pytest.mark.slow)])
def test_fast_form_is_as_accurate_as_reference_under_bf16_autocast(name):
    """Under bf16 autocast the fast form's features are no further from the float32 result than
    the reference form's (its row-wise statistics, means and gathers keep autocast's precision).
    Small-batch BN nets amplify bf16 rounding (efficientnet_b0 reaches tens of percent at stride
    32 in both forms), so the check compares the two forms' errors, level by level."""
    torch.manual_seed(0)
    enc = SparseEncoder.from_timm(name).train()
    x = torch.randn(4, 3, 64, 96)
    m = masks(4, (2, 3))

    def features(impl, bf16):
        e = copy.deepcopy(enc)
        with e.using(impl), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return e(x, m)

    exact = features("reference", False)
    for fast, ref, want in zip(features("fast", True), features("reference", True), exact):
        assert fast.dtype == ref.dtype
        fast, ref = fast.float(), ref.float()
        err_fast, err_ref = ((fast - want).norm() / want.norm()).item(), ((ref - want).norm() / want.norm()).item()
        assert err_fast <= 1.5 * err_ref + 1e-3, (err_fast, err_ref)


@pytest.mark.parametrize("name, unused", [("resnet10t", []), ("convnext_atto", ["head.norm.weight", "head.norm.bias"]),
                                          ("efficientnet_b0", ["conv_head.weight", "bn2.weight", "bn2.bias"])])
def test_parameters_that_reach_no_feature_are_found_at_build(name, unused):
    model = tiny(name, dtype=torch.float32, decoder_width=32)
    assert model.encoder.unused_parameters == unused
    assert model.unused_parameters() == [f"encoder.model.{n}" for n in unused]
    # they really get no gradient, and every other parameter does
    x = torch.randn(2, 3, 64, 96)
    model(x, model.draw_masks(x, torch.Generator().manual_seed(0))).loss.backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert no_grad == sorted(model.unused_parameters())


class OddWidths(torch.nn.Module):
    """A convnet with odd channel counts everywhere, grouped, depthwise, dilated and strided
    1x1 convolutions, max pooling and channels-last LayerNorm + Linear (as in ConvNeXt)."""

    def __init__(self, cin=5):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(cin, 7, 3, 2, 1), nn.BatchNorm2d(7), nn.ReLU())  # stride 2
        self.s4 = nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.Conv2d(7, 9, 3, 1, 2, dilation=2), nn.GroupNorm(3, 9))
        self.s8 = nn.Sequential(nn.Conv2d(9, 15, 1, 2), nn.BatchNorm2d(15), nn.Conv2d(15, 15, 5, 1, 2, groups=15))
        self.s16 = nn.Sequential(nn.Conv2d(15, 21, 3, 2, 1, groups=3), nn.BatchNorm2d(21), nn.Hardswish())
        self.s32 = _ChannelsLastMlp()

    def forward(self, x):
        return self.s32(self.s16(self.s8(self.s4(self.stem(x)))))


class _ChannelsLastMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(21, 11, 2, 2)
        self.norm = torch.nn.LayerNorm(11)
        self.mlp = torch.nn.Linear(11, 13)

    def forward(self, x):
        x = self.down(x).permute(0, 2, 3, 1)
        return self.mlp(torch.nn.functional.gelu(self.norm(x))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("model_name", ["resnet18", pytest.param("convnext_atto", marks=pytest.mark.slow), "odd"])
def test_fast_equals_reference_for_odd_channel_counts_in_the_whole_model(model_name):
    """SparK loss and every gradient with sparse_impl fast equal reference, for an input with 5
    channels, odd layer widths and a non-square image (float64)."""
    torch.manual_seed(0)
    if model_name == "odd":
        enc = SparseEncoder(OddWidths().double(), ["s4", "s8", "s16", "s32"], probe_size=64)
    else:
        enc = SparseEncoder.from_timm(model_name, in_chans=5)
    model = SparK(enc, decoder_width=64).double()
    x = torch.randn(3, 5, 64, 128, dtype=torch.float64)
    m = masks(3, (2, 4), seed=3)
    results = {}
    for impl in ("reference", "fast"):
        model.zero_grad(set_to_none=True)
        with model.encoder.using(impl):
            out = model(x, m)
        out.loss.backward()
        results[impl] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None})
    (lr, gr), (lf, gf) = results["reference"], results["fast"]
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=0)
    assert gf.keys() == gr.keys() and len(gr) > 10
    for k in gr:
        assert (gf[k] - gr[k]).norm() <= 1e-9 * gr[k].norm() + 1e-12, k


class _AccumulatesIntoDense(torch.nn.Module):
    """Adds a feature map in place into a freshly made dense tensor: the reference form runs it,
    the fast form cannot (it would have to write visible rows into a dense tensor)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.BatchNorm2d(4))
        self.b = torch.nn.Conv2d(4, 6, 3, 2, 1)

    def forward(self, x):
        y = self.a(x)
        acc = torch.zeros(y.shape, dtype=y.dtype, device=y.device)
        acc += y
        return self.b(acc)


def test_a_model_only_the_reference_form_runs_falls_back_with_a_warning():
    with pytest.warns(UserWarning, match="sparse_impl='reference'"):
        enc = SparseEncoder(_AccumulatesIntoDense(), ["a", "b"], probe_size=32)
    assert enc.sparse_impl == "reference"
    assert enc.patch_size == (4, 4)
    feats = enc(torch.randn(2, 3, 8, 12), masks(2, (2, 3)))
    assert [tuple(f.shape) for f in feats] == [(2, 4, 4, 6), (2, 6, 2, 3)]


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_whole_model_runs_on_the_meta_device(name):
    """Masks, sparse encoder, densify, decoder and loss, forward and backward, on the ``meta``
    device: every tensor the model makes follows the input's device (a CPU-made one would fail
    here as on a GPU) and no value is read by the host."""
    model = tiny(name, dtype=torch.float32).to("meta").train()
    x = torch.empty(2, 3, 64, 96, device="meta")
    masks = model.draw_masks(x)
    assert masks.visible.device.type == "meta" and masks.keep is not None
    out = model(x, masks)
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    out.loss.backward()
    used = [p for n, p in model.named_parameters() if not n.startswith("encoder.model.head.")]
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in used)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_fast_training_step_has_no_host_synchronising_op(name):
    """Forward and backward with the fast sparse form run no operation whose output size or
    value must be read by the host (nonzero, masked_select, item, ...): every sample keeps the
    same number of patches, so all shapes are known in advance."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"nonzero", "nonzero_static", "masked_select", "_local_scalar_dense", "item", "is_nonzero",
               "unique", "_unique2", "bincount"}
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = tiny(name, dtype=torch.float32)
    x = torch.randn(2, 3, 64, 96)
    masks = model.draw_masks(x, torch.Generator().manual_seed(0))
    with Record():
        out = model(x, masks)
        out.loss.backward()
    assert "convolution" in seen and "convolution_backward" in seen  # the recorder saw the computation
    assert not syncing & set(seen), sorted(syncing & set(seen))
