"""Feature discovery (sparkmim.features): timm metadata, the dense probe, multi-branch stages."""

import pytest
import torch
from torch import nn

import sparkmim
from sparkmim import SparseEncoder, SparseSemanticsError, encoder, features
from sparkmim.features import FeatureSpec, discover_features


class Tiny(nn.Module):
    """stem (stride 2) -> a (stride 4) -> b (stride 8) -> a head that must never run."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1), nn.ReLU())
        self.b = nn.Conv2d(6, 10, 3, 2, 1)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        x = self.b(self.a(self.stem(x)))
        if not torch.compiler.is_compiling() and getattr(self, "refuse_head", False):
            raise AssertionError("the head ran")
        return self.head(x.mean((2, 3)))


def specs(found):
    """(module, stride, channels) per map; 2-D strides are checked square and given as one int."""
    assert all(len(s.stride) == 2 and s.stride[0] == s.stride[1] for s in found), found
    return [(s.module, s.stride[0], s.channels) for s in found]


def test_feature_spec_keeps_its_old_import_paths():
    assert encoder.FeatureSpec is features.FeatureSpec is sparkmim.FeatureSpec is FeatureSpec


def test_probe_picks_the_last_module_of_each_stride_and_stops_after_the_last_feature():
    found, stop_at = discover_features(Tiny(), None, 3, 32, 4)
    assert specs(found) == [("a", 4, 6), ("b", 8, 10)]
    assert stop_at == "b"
    found, _ = discover_features(Tiny(), None, 3, 32, 2)
    assert specs(found) == [("stem", 2, 4), ("a", 4, 6), ("b", 8, 10)]


def test_named_modules_and_timm_feature_info():
    assert specs(discover_features(Tiny(), ["a", "b"], 3, 32, 4)[0]) == [("a", 4, 6), ("b", 8, 10)]
    model = Tiny()
    model.feature_info = [{"module": "stem", "reduction": 2, "num_chs": 4},
                          {"module": "a.0", "reduction": 4, "num_chs": 6}, {"module": "b", "reduction": 8, "num_chs": 10}]
    assert specs(discover_features(model, None, 3, 32, 4)[0]) == [("a.0", 4, 6), ("b", 8, 10)]
    model.feature_info = [{"module": "stages_1", "reduction": 4}]  # names of a features_only wrapper: probe instead
    assert specs(discover_features(model, None, 3, 32, 4)[0]) == [("a", 4, 6), ("b", 8, 10)]


class TwoBranches(nn.Module):
    """A stage that returns its maps at strides 4 and 8 as a list (as HRNet's stages do)."""

    def __init__(self):
        super().__init__()
        self.fine, self.coarse = nn.Conv2d(4, 5, 3, 1, 1), nn.Conv2d(4, 7, 3, 2, 1)

    def forward(self, x):
        return [self.fine(x), self.coarse(x)]


class MultiBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 4, 1)
        self.stage = TwoBranches()
        self.fuse = nn.Identity()

    def forward(self, x):
        fine, coarse = self.fuse(self.stage(self.stem(x)))
        return coarse


def test_a_multi_branch_stage_gives_its_branch_at_the_next_stride():
    found, _ = discover_features(MultiBranch(), ["stem", "stage"], 3, 32, 4)
    assert specs(found) == [("stem", 4, 4), ("stage", 8, 7)]
    with pytest.raises(ValueError, match="no output at stride 2"):  # its first listed stage must give stride 2
        discover_features(MultiBranch(), ["stage"], 3, 32, 2)


def test_bad_feature_lists_are_refused():
    with pytest.raises(ValueError, match="distinct strides"):
        discover_features(Tiny(), ["a", "a.0"], 3, 32, 4)
    with pytest.raises(ValueError, match="is not a map of a 32x32 probe"):
        discover_features(Tiny(), ["head"], 3, 32, 4)
    model = Tiny()
    model.spare = nn.Conv2d(6, 6, 1)  # never run by the forward
    with pytest.raises(ValueError, match="'spare' produced no 4-D feature map"):
        discover_features(model, ["a", "spare"], 3, 32, 4)


class SelfAttention(nn.Module):
    def forward(self, x):
        raise RuntimeError("expected input size 224")


def test_a_failing_probe_names_the_layer_and_recognises_attention():
    model = Tiny()
    model.a = nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1), SelfAttention())
    with pytest.raises(SparseSemanticsError, match=r"layer 'a\.1' \(SelfAttention\): RuntimeError: expected input size "
                                                   r"224\. Tiny has self-attention"):
        discover_features(model, None, 3, 32, 4)
    assert model.training  # the probe restores the mode


def test_the_encoder_skips_the_layers_after_its_last_feature():
    model = Tiny()
    enc = SparseEncoder(model, check=False)
    model.refuse_head = True
    x = torch.randn(2, 3, 16, 24)
    v = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    v[:, :, 0, 0] = True
    assert [tuple(f.shape) for f in enc(x, v)] == [(2, 6, 4, 6), (2, 10, 2, 3)]


class SharedActivation(nn.Module):
    """MONAI EfficientNet's pattern: one activation module called by the stem (stride 2) and again
    at the end (stride 8), and "same" padding as a separate ConstantPad2d module (on a 32 px probe
    the stride-8 map padded by 2 per side is 8 x 8, as a stride-4 map is)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 2, 1)
        self.act = nn.SiLU()
        self.a = nn.Conv2d(4, 6, 3, 2, 1)
        self.b = nn.Conv2d(6, 8, 3, 2, 1)
        self.pad = nn.ConstantPad2d(2, 0.0)
        self.c = nn.Conv2d(8, 8, 5)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.c(self.pad(self.b(self.a(x))))
        return self.act(self.norm(x))


def test_modules_run_twice_and_padding_layers_are_no_feature_maps():
    """Discovery passes over a module that runs more than once (it would stop the forward at its
    first call) and padding layers (their size can pass for another stride); naming a module that
    runs twice is refused in one line; the encoder built on the rest is the dense model."""
    model = SharedActivation().double()
    found, stop = discover_features(model, None, 3, 32, 4)
    assert [(s.module, s.stride) for s in found] == [("a", (4, 4)), ("norm", (8, 8))] and stop == "norm"
    with pytest.raises(ValueError, match=r"feature module 'act' runs 2 times in one forward \(outputs 16x16, 4x4\)"):
        discover_features(model, ["a", "act"], 3, 32, 4)
    enc = SparseEncoder(model)
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    visible = torch.ones(2, 1, 2, 3, dtype=torch.bool)
    for sparse, dense in zip(enc(x, visible), enc(x)):
        torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
