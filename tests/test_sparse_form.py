"""The choice of sparse form for one forward pass (sparkmim.sparse.form)."""

import pytest
import torch
from torch import nn

from sparkmim import MaskPyramid, SparseEncoder
from sparkmim.sparse import FastSparseMode, SparseMap, SparseMode, sparse_form


def unequal_masks():
    """Sample 0 keeps 2 patches, sample 1 keeps 3."""
    v = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    v[0, 0, 0, 0] = v[0, 0, 1, 2] = True
    v[1, 0, 0, 1] = v[1, 0, 1, 1] = v[1, 0, 1, 0] = True
    return v


def test_unequal_visible_counts_per_sample_use_the_reference_form():
    masks = MaskPyramid.from_visible(unequal_masks())
    assert masks.keep is None
    x = torch.randn(2, 3, 16, 24)
    with sparse_form("fast", masks) as form:
        assert type(form.mode) is SparseMode and not form.fast
        entered = form.enter(x)
        assert entered is x
    out = form.exit(torch.ones(2, 4, 4, 6), 2)
    torch.testing.assert_close(out, masks.at(2).expand(2, 4, 4, 6).to(out.dtype))


def test_equal_counts_use_the_fast_form_unless_asked_or_compiling(monkeypatch):
    v = unequal_masks()
    v[1, 0, 1, 0] = False
    masks = MaskPyramid.from_visible(v)
    x = torch.randn(2, 3, 16, 24)
    with sparse_form("fast", masks) as form:
        assert type(form.mode) is FastSparseMode and form.fast
        rows = form.enter(x)
        assert isinstance(rows, SparseMap) and rows.tiles.shape == (2 * 2, 3, 8, 8)
        y = rows * 2.0
    torch.testing.assert_close(form.exit(y, 8), torch.where(masks.at(8), 2 * x, 0.0))
    assert type(sparse_form("reference", masks).mode) is SparseMode
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert type(sparse_form("fast", masks).mode) is SparseMode
    with pytest.raises(ValueError, match="sparse_impl must be one of"):
        sparse_form("dense", masks)


def test_the_mode_is_active_only_inside_the_block():
    masks = MaskPyramid(torch.ones(1, 1, 1, 2, dtype=torch.bool), keep=2)
    form = sparse_form("fast", masks)
    assert not torch.overrides._get_current_function_mode_stack()
    with form:
        assert torch.overrides._get_current_function_mode_stack() == [form.mode]
    assert not torch.overrides._get_current_function_mode_stack()


def test_exit_keeps_the_images_memory_format():
    masks = MaskPyramid(unequal_masks()[:, :, :, :2].clone().fill_(True), keep=4)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    for impl in ("fast", "reference"):
        with sparse_form(impl, masks) as form:
            y = form.enter(x) + 1.0
        assert form.exit(y, 8).is_contiguous(memory_format=torch.channels_last), impl


def test_an_encoder_given_unequal_counts_runs_the_reference_form_with_the_same_results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1),
                          nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, 2, 1)).double()
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    feats = {}
    for impl in ("fast", "reference"):
        enc = SparseEncoder(model, ["4", "5"], probe_size=32, sparse_impl=impl).train()
        held = []
        enc.model[4].register_forward_hook(lambda m, a, o, held=held: held.append(type(a[0])))
        feats[impl] = enc(x, unequal_masks())  # a plain mask: counts read once
        assert held == [torch.Tensor]
    for a, b in zip(feats["fast"], feats["reference"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
