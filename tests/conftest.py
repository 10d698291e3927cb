import pytest
import torch

P = 32  # total stride of every zoo model

# (timm name, family) -- small variants of each family, built from scratch
# run with -m slow (heavier, or families already covered by the default set)
TIMM_ZOO_SLOW = {"vgg11", "mobileone_s0", "xception41", "ghostnetv2_100", "inception_next_tiny", "poolformer_s12",
                 "repvit_m1", "mobilenetv4_conv_small", "resnet50_gn", "regnetz_b16", "fastvit_t8"}
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
    ("resnetblur18", "ResNet with BlurPool"),
    ("ghostnetv2_100", "GhostNetV2 (DFC attention)"),
    ("inception_next_tiny", "InceptionNeXt"),
    ("poolformer_s12", "PoolFormer"),
    ("repvit_m1", "RepViT"),
    ("mobilenetv4_conv_small", "MobileNetV4"),
    ("resnet50_gn", "ResNet with GroupNorm"),
    ("regnetz_b16", "RegNetZ"),
    ("fastvit_t8", "FastViT (RepMixer)"),
]

TORCHVISION_ZOO = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "vgg11"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
