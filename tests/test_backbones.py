"""Backbones by name: stochastic depth set where the model has it, refused where it has not."""

import pytest

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
