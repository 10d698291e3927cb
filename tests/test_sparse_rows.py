"""Maps held as visible rows (sparkmim.sparse.rows): geometry, gathering and scattering."""

import pytest
import torch

from sparkmim import MaskPyramid, SparseSemanticsError, random_visible
from sparkmim.sparse import SparseMap, to_dense
from sparkmim.sparse.rows import Geometry, to_rows


def masks(seed=0, batch=3, grid=(3, 4)):
    v = random_visible(batch, grid, 0.5, generator=torch.Generator().manual_seed(seed))
    return MaskPyramid(v, keep=int(v[0].sum()))


def test_visible_patch_ids_and_rows_come_from_one_ordering():
    for seed in range(5):
        m = masks(seed)
        ids = m.visible_patch_ids()
        assert ids.shape == (3, m.keep) and bool((ids[:, 1:] > ids[:, :-1]).all())
        flat = m.visible.reshape(3, -1)
        assert bool(flat.gather(1, ids).all())
        for f in (1, 2, 4):
            g = Geometry(m, f)
            assert torch.equal(m.rows(f), m.at(f).reshape(-1).nonzero().squeeze(1))
            assert torch.equal(g.sites.sort().values, m.rows(f))
            assert g.rows_per_sample == m.keep * f * f and (g.height, g.width) == (3 * f, 4 * f)
    with pytest.raises(ValueError, match="same number of visible patches"):
        MaskPyramid(masks().visible).visible_patch_ids()


def test_rows_are_patch_by_patch_and_row_major_within_a_patch():
    v = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    v[0, 0, 0, 1] = v[0, 0, 1, 0] = True
    g = Geometry(MaskPyramid(v, keep=2), 2)
    # a 4 x 4 map: patch (0, 1) holds sites 2, 3, 6, 7; patch (1, 0) holds 8, 9, 12, 13
    assert g.sites.tolist() == [2, 3, 6, 7, 8, 9, 12, 13]


@pytest.mark.parametrize("shape,spatial_dim", [((3, 5, 6, 8), 2), ((3, 6, 8, 5), 1), ((3, 2, 5, 6, 8), 3),
                                               ((3, 5, 6, 8, 2), 2)])
def test_gathering_then_scattering_gives_the_masked_map(shape, spatial_dim):
    m = masks()
    g = Geometry(m, 2)
    x = torch.randn(shape, dtype=torch.float64)
    sm = to_rows(x, g, spatial_dim)
    assert sm.shape == x.shape and sm.rows.shape[:2] == (3, g.rows_per_sample)
    mask = m.at(2)[:, 0]  # (B, H, W)
    mask = mask.view(3, *([1] * (spatial_dim - 1)), 6, 8, *([1] * (len(shape) - spatial_dim - 2)))
    torch.testing.assert_close(to_dense(sm), torch.where(mask, x, 0.0), rtol=0, atol=0)
    assert sm.canvas(float("-inf")).masked_select(~mask.expand(shape)).eq(float("-inf")).all()
    for d in range(len(shape)):  # rows_dim sends each logical dim to the rows dim that holds it
        r = sm.rows_dim(d)
        assert r == 1 if d in (spatial_dim, spatial_dim + 1) else sm.rows.shape[r] == x.shape[d]


def test_a_sparse_map_outside_the_sparse_forward_is_refused():
    sm = to_rows(torch.randn(3, 2, 6, 8), Geometry(masks(), 2), 2)
    assert isinstance(sm, SparseMap) and "SparseMap(shape=(3, 2, 6, 8)" in repr(sm)
    with pytest.raises(SparseSemanticsError, match="outside the sparse encoder's forward"):
        sm + 1
    t = torch.ones(2)
    assert to_dense(t) is t
