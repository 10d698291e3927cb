import pytest
import torch

from sparkmim import MaskPyramid, grid_size, num_visible, random_visible


@pytest.mark.parametrize("grid,ratio", [((7, 7), 0.6), ((2, 3), 0.6), ((4, 9), 0.75), ((5, 2), 0.1)])
def test_exact_visible_count_per_sample(grid, ratio):
    v = random_visible(16, grid, ratio, generator=torch.Generator().manual_seed(1))
    assert v.shape == (16, 1, *grid) and v.dtype == torch.bool
    expected = round(grid[0] * grid[1] * (1 - ratio))
    assert (v.flatten(1).sum(1) == expected).all()
    assert num_visible(grid[0] * grid[1], ratio) == expected


def test_masks_differ_per_sample_and_follow_the_generator():
    a = random_visible(32, (7, 7), 0.6, generator=torch.Generator().manual_seed(3))
    b = random_visible(32, (7, 7), 0.6, generator=torch.Generator().manual_seed(3))
    c = random_visible(32, (7, 7), 0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(m.flatten().tolist()) for m in a}) > 28
    # every position is masked and visible sometimes: the draw is not biased to a region
    freq = random_visible(4000, (4, 4), 0.6, generator=torch.Generator().manual_seed(0)).float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 6 / 16), atol=0.03)


def test_grid_size_and_errors():
    assert grid_size(224, 160, 32) == (7, 5)
    with pytest.raises(ValueError, match="not a multiple of the patch size 32"):
        grid_size(225, 224, 32)
    with pytest.raises(ValueError, match="single"):
        grid_size(32, 32, 32)
    with pytest.raises(ValueError, match="strictly between"):
        num_visible(49, 1.0)


def test_pyramid_views_and_rows():
    v = random_visible(3, (2, 3), 0.5, generator=torch.Generator().manual_seed(0))
    m = MaskPyramid(v, keep=3)
    m4 = m.at(4)
    assert m4.shape == (3, 1, 8, 12)
    assert torch.equal(m4[:, :, ::4, ::4], v) and torch.equal(m4[:, :, 3::4, 3::4], v)
    assert m.at(4) is m4  # computed once per batch
    assert m.factor(8, 12) == (4, 4) and m.factor(8, 8) is None and m.factor(1, 1) is None
    assert m.factor(4, 12) == (2, 4)  # a factor per axis, images as volumes
    rows = m.rows(4)
    assert torch.equal(rows, m4.reshape(-1).nonzero().squeeze(1))
    # a user mask with unequal counts still works (dynamic rows)
    v2 = v.clone()
    v2[0, 0, 0, :] = True
    m2 = MaskPyramid.from_visible(v2)
    assert m2.keep is None
    assert torch.equal(m2.rows(2), m2.at(2).reshape(-1).nonzero().squeeze(1))
