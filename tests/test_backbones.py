"""Backbones by name: stochastic depth set where the model has it, refused where it has not."""

import pytest
import torch

from sparkmim.backbones import create_backbone, stochastic_depth_rates


@pytest.mark.parametrize("name,rate", [("resnet18", 0.05), ("convnext_atto", 0.2), ("timm:efficientnet_b0", 0.1),
                                       ("torchvision:efficientnet_b0", 0.1)])
def test_drop_path_sets_the_models_stochastic_depth(name, rate):
    rates = stochastic_depth_rates(create_backbone(name, drop_path=rate))
    # per-block rates ramp up with depth to the rate (EfficientNet's stop one block short of it)
    assert rates and 0.9 * rate <= max(rates) <= rate * (1 + 1e-6)
    assert stochastic_depth_rates(create_backbone(name, drop_path=0.0)) == []


def test_drop_path_zero_overrides_a_torchvision_default():
    # torchvision's ConvNeXt-T defaults to stochastic depth 0.1; drop_path 0 means none, None keeps the default
    assert max(stochastic_depth_rates(create_backbone("torchvision:convnext_tiny"))) == pytest.approx(0.1)
    assert stochastic_depth_rates(create_backbone("torchvision:convnext_tiny", drop_path=0.0)) == []


@pytest.mark.parametrize("name", ["vgg11", "densenet121", "torchvision:resnet18",
                                  "torchvision:mobilenet_v3_small"])  # the last accepts the keyword and ignores it
def test_drop_path_is_refused_for_a_backbone_without_it(name):
    with pytest.raises(ValueError, match="has no stochastic depth"):
        create_backbone(name, drop_path=0.1)
    create_backbone(name, drop_path=0.0)  # no stochastic depth asked: fine


def test_nnunet_presets_are_nnunets_own_networks_and_their_encoder_stages_are_decoded():
    """``nnunet:plain`` (and the ResEnc presets) are the networks nnU-Net v2 builds for an isotropic
    3d_fullres plan (dynamic-network-architectures; 6 stages, strides 1, 2, 2, 2, 2, 2, widths 32
    to 320); SparK decodes encoder stages 1-5 (strides 2-32), trains stage 0 through them, and
    leaves the U-Net's decoder out (unused, exported as built)."""
    pytest.importorskip("dynamic_network_architectures")
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from sparkmim import SparseEncoder
    from sparkmim.backbones import create_backbone, feature_modules_for

    model = create_backbone("nnunet:plain", in_chans=2)
    assert type(model) is PlainConvUNet and len(model.encoder.stages) == 6
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs[0].in_channels == 2 and [c.out_channels for c in convs[::2]] == [32, 64, 128, 256, 320, 320]
    assert [c.stride for c in convs[::2]] == [(1, 1, 1)] + [(2, 2, 2)] * 5
    assert all(isinstance(m, torch.nn.InstanceNorm3d) and m.affine for m in model.modules()
               if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm))
    enc = SparseEncoder(model, feature_modules_for("nnunet:plain"))
    assert [s.module for s in enc.features] == [f"encoder.stages.{i}" for i in range(1, 6)]
    assert enc.strides == tuple((2**i,) * 3 for i in range(1, 6)) and enc.sparse_impl == "fast"
    assert enc.unused_parameters and all(n.startswith("decoder.") for n in enc.unused_parameters)
    with pytest.raises(ValueError, match="unknown nnU-Net network 'resenc_s'.*resenc_m, resenc_l, resenc_xl, plain"):
        create_backbone("nnunet:resenc_s")
