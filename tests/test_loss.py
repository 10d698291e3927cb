import torch

from sparkmim import masked_patch_loss, normalize_patches, patchify, unpatchify


def test_patchify_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).view(2, 3, 4, 6)
    p = patchify(x, 2)
    assert p.shape == (2, 6, 12)
    # patch (row 0, col 1) of sample 1 holds pixels [0:2, 2:4] of every channel, channel last
    expected = x[1, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(p[1, 1], expected)
    assert torch.equal(unpatchify(p, 2, (2, 3), 3), x)


def test_loss_equals_formula_on_hand_made_tensors():
    # one sample, 1 channel, 2x2 patches on a 1x2 grid: patch A visible, patch B masked
    img = torch.tensor([[[[1.0, 2.0, 0.0, 4.0], [3.0, 4.0, 8.0, 4.0]]]], dtype=torch.float64)
    pred = torch.zeros_like(img)
    pred[..., 2:] = 1.0
    visible = torch.tensor([[[[True, False]]]])
    # patch B pixels (row-major within the patch): 0, 4, 8, 4 -> mean 4, unbiased var 32/3
    b = torch.tensor([0.0, 4.0, 8.0, 4.0], dtype=torch.float64)
    target = (b - 4.0) / torch.sqrt(torch.tensor(32.0 / 3.0 + 1e-6, dtype=torch.float64))
    expected = ((1.0 - target) ** 2).mean()
    loss = masked_patch_loss(pred, img, visible, 2)
    assert torch.allclose(loss, expected, rtol=0, atol=1e-12)
    # prediction error on the visible patch does not count ...
    pred2 = pred.clone()
    pred2[..., :2] = 100.0
    assert torch.allclose(masked_patch_loss(pred2, img, visible, 2), expected, rtol=0, atol=1e-12)
    # ... unless the loss is taken on all patches
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    ta = (a - 2.5) / torch.sqrt(torch.tensor(5.0 / 3.0 + 1e-6, dtype=torch.float64))
    all_expected = (((100.0 - ta) ** 2).mean() + expected) / 2
    assert torch.allclose(masked_patch_loss(pred2, img, visible, 2, masked_only=False), all_expected, atol=1e-12)
    # without per-patch normalisation the target is patch B's pixels themselves
    raw = ((1.0 - b) ** 2).mean()
    assert torch.allclose(masked_patch_loss(pred, img, visible, 2, norm_pix=False), raw, rtol=0, atol=1e-12)


def test_loss_averages_over_masked_patches_of_all_samples():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    pred = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    visible = torch.rand(3, 1, 2, 2, generator=g) > 0.5
    visible[0, 0, 0, 0] = False
    t, _, _ = normalize_patches(patchify(img, 4))
    per = ((patchify(pred, 4) - t) ** 2).mean(-1)
    masked = ~visible.flatten(1)
    assert torch.allclose(masked_patch_loss(pred, img, visible, 4), per[masked].mean(), atol=1e-12)
