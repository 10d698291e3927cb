"""Maps held as visible tiles (sparkmim.sparse.tiles): geometry, gathering, scattering, halos."""

import pytest
import torch
import torch.nn.functional as F

from sparkmim import MaskPyramid, SparseSemanticsError, random_visible
from sparkmim.sparse import SparseMap, to_dense
from sparkmim.sparse.tiles import Geometry, Patches, to_tiles


def masks(seed=0, batch=3, grid=(3, 4)):
    v = random_visible(batch, grid, 0.5, generator=torch.Generator().manual_seed(seed))
    return MaskPyramid(v, keep=int(v[0].sum()))


def test_tiles_are_the_visible_patches_sample_by_sample_in_ascending_order():
    for seed in range(5):
        m = masks(seed)
        p = Patches(m)
        ids = m.visible_patch_ids()
        assert ids.shape == (3, m.keep) and bool((ids[:, 1:] > ids[:, :-1]).all())
        assert bool(m.visible.reshape(3, -1).gather(1, ids).all())
        assert p.sample.tolist() == [b for b in range(3) for _ in range(m.keep)]
        assert torch.equal(p.coords[0] * 4 + p.coords[1], ids.reshape(-1))
        # slot: the tile number of each visible patch, B*K for masked ones
        for t in range(p.count):
            assert int(p.slot[p.sample[t], p.coords[0][t], p.coords[1][t]]) == t
        assert int((p.slot == p.count).sum()) == int((~m.visible).sum())
        for f in (1, 2, 4):
            g = Geometry(p, (f, f))
            assert (g.sizes, g.tiles) == ((3 * f, 4 * f), 3 * m.keep)
    with pytest.raises(ValueError, match="same number of visible patches"):
        MaskPyramid(masks().visible).visible_patch_ids()


def test_a_tile_holds_its_patchs_sites_row_major():
    v = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    v[0, 0, 0, 1] = v[0, 0, 1, 0] = True
    g = Geometry(Patches(MaskPyramid(v, keep=2)), (2, 2))
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # a 4 x 4 map: patch (0, 1) holds sites 2, 3, 6, 7; patch (1, 0) holds 8, 9, 12, 13
    assert to_tiles(x, g, 2).tiles.reshape(2, 4).tolist() == [[2, 3, 6, 7], [8, 9, 12, 13]]


@pytest.mark.parametrize("shape,spatial_dim", [((3, 5, 6, 8), 2), ((3, 6, 8, 5), 1), ((3, 2, 5, 6, 8), 3),
                                               ((3, 5, 6, 8, 2), 2)])
def test_gathering_then_scattering_gives_the_masked_map(shape, spatial_dim):
    m = masks()
    g = Geometry(Patches(m), (2, 2))
    x = torch.randn(shape, dtype=torch.float64)
    sm = to_tiles(x, g, spatial_dim)
    tile_shape = list(shape)
    tile_shape[0], tile_shape[spatial_dim], tile_shape[spatial_dim + 1] = g.tiles, 2, 2
    assert sm.shape == x.shape and list(sm.tiles.shape) == tile_shape
    mask = m.at(2)[:, 0]  # (B, H, W)
    mask = mask.view(3, *([1] * (spatial_dim - 1)), 6, 8, *([1] * (len(shape) - spatial_dim - 2)))
    torch.testing.assert_close(to_dense(sm), torch.where(mask, x, 0.0), rtol=0, atol=0)
    assert sm.canvas(float("-inf")).masked_select(~mask.expand(shape)).eq(float("-inf")).all()


@pytest.mark.parametrize("factor,size,offset", [(2, 4, 1), (2, 3, 0), (1, 3, 1), (1, 7, 3), (4, 10, 3), (4, 5, 1),
                                                (2, 2, 0)])
@pytest.mark.parametrize("fill", [0.0, float("-inf")])
def test_halo_windows_equal_windows_of_the_padded_masked_canvas(factor, size, offset, fill):
    """A tile with its halo (window of ``size`` starting ``offset`` sites above-left of the patch
    corner) equals that window of the canvas (``fill`` at masked sites) padded with ``fill``:
    neighbours' visible sites come from their tiles, masked and off-map sites are ``fill``."""
    m = masks(seed=3)
    g = Geometry(Patches(m), (factor, factor))
    x = torch.randn(3, 5, 3 * factor, 4 * factor, dtype=torch.float64)
    sm = to_tiles(x, g, 2)
    halo = sm.halo((size, size), (offset, offset), fill)
    pad = size  # room for any window
    canvas = F.pad(sm.canvas(fill), (pad, pad, pad, pad), value=fill)
    p = g.patches
    for t in range(g.tiles):
        y0 = int(p.coords[0][t]) * factor - offset + pad
        x0 = int(p.coords[1][t]) * factor - offset + pad
        window = canvas[int(p.sample[t]), :, y0: y0 + size, x0: x0 + size]
        assert torch.equal(halo[t], window), t


def test_a_sparse_map_outside_the_sparse_forward_is_refused():
    sm = to_tiles(torch.randn(3, 2, 6, 8), Geometry(Patches(masks()), (2, 2)), 2)
    assert isinstance(sm, SparseMap) and "SparseMap(shape=(3, 2, 6, 8)" in repr(sm)
    with pytest.raises(SparseSemanticsError, match="outside the sparse encoder's forward"):
        sm + 1
    t = torch.ones(2)
    assert to_dense(t) is t


@pytest.mark.parametrize("factor,size,offset", [((1, 2, 2), (3, 4, 4), (1, 1, 1)), ((2, 2, 4), (4, 3, 5), (1, 0, 2)),
                                                ((2, 1, 2), (2, 3, 2), (0, 1, 0)), ((1, 1, 1), (3, 3, 3), (1, 1, 1))])
@pytest.mark.parametrize("fill", [0.0, float("-inf")])
def test_3d_halo_windows_equal_windows_of_the_padded_masked_canvas(factor, size, offset, fill):
    """Volumes: tiles ``(B*K, C, fd, fh, fw)`` with a factor per axis; a tile with its 3-D halo
    equals that window of the canvas (``fill`` at masked sites) padded with ``fill``, and
    gathering then scattering gives the masked map."""
    m = masks(seed=4, batch=2, grid=(2, 3, 2))
    g = Geometry(Patches(m), factor)
    x = torch.randn(2, 3, *(a * f for a, f in zip((2, 3, 2), factor)), dtype=torch.float64)
    sm = to_tiles(x, g, 2)
    assert tuple(sm.tiles.shape) == (g.tiles, 3, *factor) and sm.shape == x.shape
    torch.testing.assert_close(to_dense(sm), torch.where(m.at(factor), x, 0.0), rtol=0, atol=0)
    halo = sm.halo(size, offset, fill)
    pad = max(size)
    canvas = F.pad(sm.canvas(fill), (pad,) * 6, value=fill)
    p = g.patches
    for t in range(g.tiles):
        corner = [int(c[t]) * f - o + pad for c, f, o in zip(p.coords, factor, offset)]
        window = canvas[(int(p.sample[t]), slice(None), *(slice(c, c + s) for c, s in zip(corner, size)))]
        assert torch.equal(halo[t], window), t
