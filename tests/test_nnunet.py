"""nnU-Net's networks from plans files, every stage decoded, and checkpoints stock nnU-Net loads
(checked with nnU-Net v2's own network builder and ``load_pretrained_weights``)."""

import json

import pytest
import torch

from nets3d import plans_dict, write_plans
from sparkmim import SparK, SparseEncoder
from sparkmim.backbones import create_backbone, feature_modules_for
from sparkmim.nnunet import create_nnunet, nnunet_checkpoint, read_plans

pytest.importorskip("dynamic_network_architectures")


def _nnunet():
    """nnU-Net v2's network builder and pretrained-weights loader (installed with --no-deps)."""
    pytest.importorskip("batchgenerators")
    builder = pytest.importorskip("nnunetv2.utilities.get_network_from_plans")
    loader = pytest.importorskip("nnunetv2.run.load_pretrained_weights")
    return builder.get_network_from_plans, loader.load_pretrained_weights


def nnunets_network(plans, configuration="3d_fullres", in_chans=1, classes=3):
    """The network nnU-Net's trainer builds from a plans file (deep supervision on, as it trains)."""
    get_network_from_plans, _ = _nnunet()
    arch = read_plans(plans, configuration)["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  in_chans, classes, allow_init=True, deep_supervision=True)


@pytest.mark.parametrize("kind", ["anisotropic", "plain"])
def test_a_plans_file_builds_exactly_the_network_nnunet_builds(tmp_path, kind):
    """Same class, keys, shapes and, from the same seed, the same initial weights (nnU-Net's own
    initialisation) as nnU-Net v2's get_network_from_plans; a configuration inheriting from
    3d_fullres builds the same network."""
    plans = write_plans(tmp_path / "nnUNetPlans.json", kind)
    torch.manual_seed(0)
    theirs = nnunets_network(plans, in_chans=2)
    torch.manual_seed(0)
    ours = create_backbone(f"nnunet:{plans}", in_chans=2, num_classes=3)
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "the initial weights differ from nnU-Net's"
    inherited = create_nnunet(f"{plans}:3d_cascade_fullres", 2, 3)
    assert {k: v.shape for k, v in inherited.state_dict().items()} == {k: v.shape for k, v in a.items()}


def test_plans_of_nnunet_before_2_4_are_read_as_nnunet_reads_them(tmp_path):
    new = plans_dict("plain")
    arch = new["configurations"]["3d_fullres"].pop("architecture")["arch_kwargs"]
    new["configurations"]["3d_fullres"].update(
        UNet_class_name="PlainConvUNet", UNet_base_num_features=4, unet_max_num_features=16,
        n_conv_per_stage_encoder=arch["n_conv_per_stage"], n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"],
        conv_kernel_sizes=arch["kernel_sizes"], pool_op_kernel_sizes=arch["strides"], num_pool_per_axis=[3, 3, 3])
    old = tmp_path / "old.json"
    old.write_text(json.dumps(new))
    built = create_nnunet(str(old), 1).state_dict()
    expected = create_nnunet(str(write_plans(tmp_path / "new.json", "plain")), 1).state_dict()
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in expected.items()}


def test_bad_plans_are_refused_in_one_line_naming_what_is_wrong(tmp_path):
    plans = plans_dict("plain")
    plans["configurations"]["2d"] = {"architecture": {**plans["configurations"]["3d_fullres"]["architecture"]}}
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"] = {
        **plans["configurations"]["2d"]["architecture"]["arch_kwargs"], "conv_op": "torch.nn.modules.conv.Conv2d"}
    plans["configurations"]["evil"] = {"architecture": {**plans["configurations"]["3d_fullres"]["architecture"],
                                                        "network_class_name": "os.system"}}
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(plans))
    cases = [(f"{path}:2d", "sparkmim pre-trains nnU-Net's 3-D configurations"),
             (f"{path}:3d_lowres", r"has no configuration '3d_lowres' \(it has 3d_fullres, 3d_cascade_fullres, 2d, evil\)"),
             (f"{path}:evil", "the plans name the network 'os.system'; sparkmim builds only classes of "
                              "dynamic_network_architectures"),
             ("resenc_s", r"unknown nnU-Net network 'resenc_s' \(did you mean nnunet:resenc_m\?\)"),
             (str(tmp_path / "none.json"), "does not exist")]
    for spec, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
            create_nnunet(spec)
        assert "\n" not in str(e.value)


def test_an_anisotropic_plan_decodes_every_stage(tmp_path):
    """Strides (1,2,2), (2,2,2), (1,2,2): all three strided stages are feature maps, and the
    decoder's ladder steps through each (up-sampling the in-plane axes only where the encoder
    strided them only); the prediction has the input's shape."""
    plans = write_plans(tmp_path / "nnUNetPlans.json", "anisotropic")
    names = feature_modules_for(f"nnunet:{plans}")
    assert names == ["encoder.stages.1", "encoder.stages.2", "encoder.stages.3"]
    enc = SparseEncoder(create_backbone(f"nnunet:{plans}", in_chans=1), names)
    assert enc.strides == ((1, 2, 2), (2, 4, 4), (2, 8, 8)) and enc.patch_size == (2, 8, 8)
    model = SparK(enc, decoder_width=32)
    assert model.decoder.factors == [(1, 1, 1), (1, 2, 2), (2, 4, 4)]
    assert model.levels == [0, 1, 2]
    x = torch.randn(2, 1, 8, 32, 32)
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert out.prediction.shape == x.shape and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(enc.model.get_submodule(n).parameters().__next__().grad is not None for n in names)


def test_the_nnunet_export_loads_with_nnunets_own_loader_and_carries_the_runs_encoder(tmp_path):
    """nnU-Net's load_pretrained_weights accepts the checkpoint into the network nnU-Net builds
    from the plans (every key but the segmentation heads, equal shapes); afterwards its encoder,
    also where its decoder holds it, equals the pre-trained encoder, weights and features."""
    _, load_pretrained_weights = _nnunet()
    plans = write_plans(tmp_path / "nnUNetPlans.json", "anisotropic")
    trained = create_backbone(f"nnunet:{plans}", in_chans=2)
    with torch.no_grad():  # stands for pre-training: every encoder tensor changed
        for v in trained.encoder.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v))
    out = tmp_path / "nnunet-3d_fullres.pth"
    report = nnunet_checkpoint(trained.state_dict(), plans, "3d_fullres", 2, out)
    assert report["from_run"] and report["nnunet_init"] and report["seg_layers"]
    assert all(k.startswith(("encoder.", "decoder.encoder.")) for k in report["from_run"])
    network = nnunets_network(plans, in_chans=2, classes=5)
    load_pretrained_weights(network, str(out))
    mine = trained.encoder.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in network.encoder.state_dict().items())
    assert all(torch.equal(v, mine[k]) for k, v in network.decoder.encoder.state_dict().items())
    x = torch.randn(1, 2, 8, 32, 32)
    network.eval(), trained.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(network.encoder(x), trained.encoder(x)))
    assert torch.load(out, weights_only=True)["sparkmim"]["configuration"] == "3d_fullres"  # plain data


def test_an_encoder_that_does_not_fit_the_plans_is_refused_naming_a_key(tmp_path):
    plans = write_plans(tmp_path / "nnUNetPlans.json", "plain")
    two_channels = create_backbone(f"nnunet:{plans}", in_chans=2).state_dict()
    with pytest.raises(ValueError, match=r"encoder.stages.0.0.convs.0.conv.weight is \(4, 2, 3, 3, 3\) in the run, "
                                         r"\(4, 1, 3, 3, 3\) in the plans' network"):
        nnunet_checkpoint(two_channels, plans, "3d_fullres", 1, tmp_path / "x.pth")
    other = write_plans(tmp_path / "other.json", "anisotropic")
    with pytest.raises(ValueError, match="does not fit this nnU-Net network .*export with the plans the run's "
                                         "network came from"):
        nnunet_checkpoint(two_channels, other, "3d_fullres", 2, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
