"""Densify and light decoder: initialisation as in the reference recipe."""

import math

import pytest
import torch
from torch import nn

from sparkmim import SparK, SparseEncoder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SparK(SparseEncoder.from_timm("resnet18"), decoder_width=768)


def test_upsampling_layers_are_kaiming_normal_fan_out(model):
    """ConvTranspose2d: normal with std sqrt(2 / fan_out), fan_out = width x 4 x 4 (0.0128 at 768
    channels ... 0.0510 at 48), zero bias. The widths make trunc-normal(0.02) miss by 10 % or more,
    far outside the 2 % allowed here (the sample std of >= 36,864 weights is good to 0.4 %)."""
    ups = [m for m in model.decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.in_channels for m in ups] == [768, 384, 192, 96, 48]
    for m in ups:
        w = m.weight.detach().double()
        expected = math.sqrt(2.0 / (m.in_channels * 16))
        assert abs(float(w.std()) / expected - 1) < 0.02, (m.in_channels, float(w.std()), expected)
        assert abs(float(w.mean())) < 3 * expected / math.sqrt(w.numel())
        # a normal, not truncated at 2 std: about 4.6 % of the weights lie beyond 2 std
        beyond = float((w.abs() > 2 * expected).double().mean())
        assert 0.035 < beyond < 0.057, beyond
        assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_densify_projections_keep_pytorch_default_init(model):
    """Conv2d default: weight and bias uniform in +-1/sqrt(fan_in), so weight std 1/sqrt(3 fan_in)
    (here 0.0255 for the 512 -> 768 1x1 projection, 0.0120-0.0241 for the 3x3 ones; 0.0060-0.0128
    with ResNet-50's widths) and a bias that is not zero and spreads over the bound;
    trunc-normal(0.02) with zero bias fails both checks."""
    projs = [d.proj for d in model.densify]
    assert all(isinstance(p, nn.Conv2d) for p in projs) and [p.kernel_size for p in projs] == [(1, 1)] + [(3, 3)] * 3
    for p in projs:
        fan_in = p.in_channels * p.kernel_size[0] * p.kernel_size[1]
        bound = 1 / math.sqrt(fan_in)
        w, b = p.weight.detach().double(), p.bias.detach().double()
        assert abs(float(w.std()) / (bound / math.sqrt(3)) - 1) < 0.02, (p, float(w.std()))
        assert float(w.abs().max()) <= bound
        assert float(b.abs().max()) <= bound and float(b.abs().max()) > 0.5 * bound


def test_decoder_convolutions_are_trunc_normal_002_with_zero_bias(model):
    convs = [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d)]
    big = [m for m in convs if m.weight.numel() >= 10_000]
    assert len(big) >= 5
    for m in big:
        assert abs(float(m.weight.detach().double().std()) / 0.02 - 1) < 0.05
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in convs if m.bias is not None)


@pytest.mark.parametrize("sizes", [(3, 5), (2, 3, 4)], ids=["2d", "3d"])
def test_position_embedding_gives_each_axis_its_own_channels(sizes):
    """sincos: one group of channels per axis, each varying along its own axis only, sines then
    cosines; in 2-D the row comes first (the layout of sincos_2d, the reference recipe's)."""
    from sparkmim.decoder import sincos, sincos_2d

    n, c = len(sizes), 12
    emb = sincos(c, sizes, dtype=torch.float64)[0]
    assert emb.shape == (c, *sizes)
    for axis in range(n):
        group = emb[axis * c // n:(axis + 1) * c // n]
        for other in range(n):
            if other != axis:  # constant along the other axes
                assert torch.equal(group, group.narrow(other + 1, 0, 1).expand_as(group))
        pos = torch.arange(sizes[axis], dtype=torch.float64)
        first = group[(0, *[slice(None) if a == axis else 0 for a in range(n)])]
        torch.testing.assert_close(first, pos.sin())  # omega 1 for the first channel of a group
        half = group.shape[0] // 2
        torch.testing.assert_close(group[(half, *[slice(None) if a == axis else 0 for a in range(n)])], pos.cos())
    if n == 2:
        assert torch.equal(sincos_2d(c, *sizes, dtype=torch.float64)[0], emb)
    with pytest.raises(ValueError, match=f"divisible by {2 * n}"):
        sincos(2 * n + 1, sizes)
