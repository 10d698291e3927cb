import pytest
import torch

P = 32  # total stride of every zoo model

# (timm name, family) -- small variants of each family, built from scratch
TIMM_ZOO_SLOW = {"vgg11", "mobileone_s0", "xception41"}  # run with -m slow (about 25-35 s each)
TIMM_ZOO = [
    ("resnet18", "ResNet"),
    ("resnet26d", "ResNet-D"),
    ("resnext26ts", "ResNeXt"),
    ("seresnext26d_32x4d", "SE-ResNeXt"),
    ("ecaresnet26t", "ECA-ResNet"),
    ("skresnet18", "Selective-kernel ResNet"),
    ("res2net50_14w_8s", "Res2Net"),
    ("resnest14d", "ResNeSt"),
    ("regnetx_002", "RegNetX"),
    ("regnety_002", "RegNetY (SE)"),
    ("efficientnet_b0", "EfficientNet"),
    ("tf_efficientnet_b0", "EfficientNet, TF 'same' padding"),
    ("tf_efficientnetv2_b0", "EfficientNetV2, TF 'same' padding"),
    ("mobilenetv2_050", "MobileNetV2"),
    ("mobilenetv3_small_050", "MobileNetV3"),
    ("ghostnet_050", "GhostNet"),
    ("densenet121", "DenseNet"),
    ("dla34", "DLA"),
    ("dpn68", "DPN"),
    ("cs3darknet_s", "CSPNet / DarkNet"),
    ("convnext_atto", "ConvNeXt"),
    ("convnextv2_atto", "ConvNeXt-V2 (GRN)"),
    ("vgg11", "VGG"),
    ("repvgg_a0", "RepVGG"),
    ("mobileone_s0", "MobileOne"),
    ("hrnet_w18_small", "HRNet"),
    ("nf_resnet26", "NFNet-style (ScaledStdConv)"),
    ("resnetv2_50x1_bit", "ResNetV2 BiT (GroupNorm + StdConv)"),
    ("mixnet_s", "MixNet"),
    ("ese_vovnet19b_dw", "VoVNet"),
    ("rexnet_100", "ReXNet"),
    ("lcnet_050", "LCNet"),
    ("xception41", "Xception"),
    ("hgnetv2_b0", "HGNetV2"),
]

TORCHVISION_ZOO = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "vgg11"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
