"""Build backbones by name (timm or torchvision) without their classifiers."""

from __future__ import annotations

import difflib
from functools import partial

from torch import nn

from . import nnunet
from .nnunet import PRESETS as _NNUNET_PRESETS
from .nnunet import create_nnunet

__all__ = ["create_timm", "create_torchvision", "create_monai", "create_nnunet", "TESTED_NNUNET", "create_backbone",
           "feature_modules_for", "is_video_model", "TESTED_MONAI", "TESTED_TORCHVISION_VIDEO", "stochastic_depth_rates",
           "norm_kind", "strip_classifier", "TESTED_TIMM", "TESTED_TIMM_SLOW", "TESTED_TORCHVISION",
           "TESTED_TORCHVISION_SLOW"]

# Backbones whose sparse encoder is tested for no leakage, isolation, dense equivalence and strict
# weight loading (tests/test_encoder_zoo.py): (timm name, family). Other sizes of a family share its layers.
# run with -m slow (heavier, or families already covered by the default set)
TESTED_TIMM_SLOW = {"vgg11", "mobileone_s0", "xception41", "ghostnetv2_100", "inception_next_tiny", "poolformer_s12",
                 "repvit_m1", "mobilenetv4_conv_small", "resnet50_gn", "regnetz_b16", "fastvit_t8",
                 # the heaviest of the default suite (10-25 s each over the property tests)
                 "res2net50_14w_8s", "densenet121", "tf_efficientnetv2_b0", "resnetv2_50x1_bit",
                 # families whose operations another default model holds (the default suite: under 10 min on 2 cores)
                 "mixnet_s", "mobilenetv2_050", "rexnet_100", "repvgg_a0", "hrnet_w18_small", "dpn68",
                 "ghostnet_050", "skresnet18"}
TESTED_TIMM = [
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

TESTED_TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "vgg11"]
TESTED_TORCHVISION_SLOW = {"convnext_tiny", "vgg11", "efficientnet_b0", "regnet_y_400mf"}  # run with -m slow



def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


_TIMM_SOURCES = ("local-dir:", "hf-hub:")  # timm model folders and hub repositories, named for timm itself


def create_timm(name: str, *, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0, ...)``; unknown names get close suggestions."""
    import timm

    if not name.startswith(_TIMM_SOURCES) and not timm.is_model(name):
        raise ValueError(f"unknown timm model '{name}'{_suggest(name, timm.list_models())}")
    kwargs.setdefault("num_classes", 0)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def strip_classifier(model: nn.Module) -> nn.Module:
    """Replace a torchvision classifier (``fc`` or ``classifier``) by ``nn.Identity``, in place."""
    for attr in ("fc", "classifier"):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
    return model


def create_torchvision(name: str, **kwargs) -> nn.Module:
    """A torchvision classification or video model (random init unless ``weights`` is given),
    classifier removed."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models) + torchvision.models.list_models(
        module=torchvision.models.video)
    if name not in known:
        raise ValueError(f"unknown torchvision model '{name}'{_suggest(name, known)}")
    kwargs.setdefault("weights", None)
    model = strip_classifier(torchvision.models.get_model(name, **kwargs))
    if name == "s3d":  # its head pools a fixed 2x7x7 window (224 px clips only); it has no weights
        model.avgpool = nn.Identity()
    return model


# MONAI networks for volumes (spatial_dims=3): name -> (constructor, its channel argument, feature
# modules, or None to find them by stride). Classifiers are left out where the constructor allows.
_MONAI = {
    "resnet10": ("resnet10", "n_input_channels", None),
    "resnet18": ("resnet18", "n_input_channels", None),
    "resnet34": ("resnet34", "n_input_channels", None),
    "resnet50": ("resnet50", "n_input_channels", None),
    "densenet121": ("DenseNet121", "in_channels", None),
    # of a U-Net, the encoder's stages after its first stride (a stage at the input's resolution
    # has no decoder level)
    "segresnet": ("SegResNet", "in_channels", [f"down_layers.{i}" for i in range(1, 4)]),
    # nnU-Net-style: 3x3x3 kernels, strides 1, 2, 2, 2, 2, instance norm
    "dynunet": ("DynUNet", "in_channels", ["downsamples.0", "downsamples.1", "downsamples.2", "bottleneck"]),
}
_DYNUNET = dict(kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2] * 4, norm_name="instance")
TESTED_MONAI = list(_MONAI)  # tests/test_3d.py builds SparK from ResNet-10, SegResNet and DynUNet at narrow widths; test_properties.py (ResNet-50, DenseNet-121 slow)
TESTED_TORCHVISION_VIDEO = ["r3d_18", "mc3_18", "r2plus1d_18", "s3d"]  # tests/test_3d.py, slow


def create_monai(name: str, in_chans: int = 1, **kwargs) -> nn.Module:
    """A MONAI network for volumes (``spatial_dims=3``, random init): ResNet-10/18/34/50 without
    their classifier, DenseNet-121, SegResNet and DynUNet (nnU-Net-style, 5 levels; of both, the
    encoder is used: :func:`feature_modules_for`)."""
    if name not in _MONAI:
        raise ValueError(f"unknown MONAI model '{name}' (sparkmim builds {', '.join(_MONAI)}){_suggest(name, _MONAI)}")
    try:
        import monai.networks.nets as nets
    except ImportError as e:
        raise ValueError(f"monai:{name} needs MONAI: pip install 'sparkmim[3d]'") from e
    constructor, channels_arg, _ = _MONAI[name]
    kwargs = {"spatial_dims": 3, channels_arg: in_chans, **kwargs}
    if name.startswith("resnet"):
        kwargs.setdefault("feed_forward", False)
    else:
        kwargs.setdefault("out_channels", 1)
    if name == "dynunet":
        kwargs = {**_DYNUNET, **kwargs}
    return getattr(nets, constructor)(**kwargs)


TESTED_NNUNET = list(_NNUNET_PRESETS)  # tests/test_properties.py: the presets (slow), narrow nets and plans

VOLUME_SOURCES = ("monai:", "nnunet:")  # backbone name prefixes whose models take volumes


def is_video_model(name: str) -> bool:
    """True for a torchvision video model (its inputs are clips: time, height, width)."""
    if name.startswith(("timm:", *VOLUME_SOURCES)):
        return False
    import torchvision

    return name.removeprefix("torchvision:") in torchvision.models.list_models(module=torchvision.models.video)


def feature_modules_for(name: str) -> list[str] | None:
    """The feature modules of a backbone whose maps the stride search would take from the wrong
    place (the encoder half of a UNet, e.g. ``monai:segresnet``), else None."""
    if name.startswith("monai:"):
        found = _MONAI.get(name.removeprefix("monai:"))
        return found[2] if found else None
    if name.startswith("nnunet:"):
        return nnunet.feature_modules(name.removeprefix("nnunet:"))
    return None


def create_backbone(name: str, in_chans: int = 3, drop_path: float | None = None, pretrained: bool = False,
                    **kwargs) -> nn.Module:
    """``timm:NAME``, ``torchvision:NAME`` (image and video models), ``monai:NAME`` (volumes), or
    a bare name (timm first, then torchvision).

    ``drop_path`` sets the backbone's stochastic-depth rate (timm ``drop_path_rate``, torchvision
    ``stochastic_depth_prob``); 0 turns it off, None keeps the model's own default. A rate above 0
    for a model without stochastic depth raises ``ValueError``.

    ``pretrained`` loads the backbone's own published weights through timm's loader (also for
    ``local-dir:FOLDER`` and ``hf-hub:REPO`` names) or torchvision's (``weights="DEFAULT"``);
    MONAI and nnU-Net networks have none (``ValueError``)."""
    import timm
    import torchvision

    if name.startswith(VOLUME_SOURCES):
        if pretrained:
            raise ValueError(f"{name} has no published pretrained weights that sparkmim can load")
        if drop_path:
            raise ValueError(f"{name} has no stochastic depth: use --drop-path 0 with this model")
        make = create_monai if name.startswith("monai:") else nnunet.create_nnunet
        return make(name.split(":", 1)[1], in_chans, **kwargs)
    torchvision_model = name.startswith("torchvision:") or (
        not name.startswith(("timm:", *_TIMM_SOURCES)) and not timm.is_model(name)
        and name in torchvision.models.list_models(module=torchvision.models))
    if torchvision_model and in_chans != 3:
        raise ValueError(f"torchvision model {name} takes 3 input channels; use a timm model for in_chans={in_chans}")
    if pretrained and torchvision_model:  # the loader of the library the model comes from (may download)
        kwargs["weights"] = "DEFAULT"
    elif pretrained:
        kwargs["pretrained"] = True
    if torchvision_model:
        build, key = partial(create_torchvision, name.removeprefix("torchvision:")), "stochastic_depth_prob"
    else:
        build, key = partial(create_timm, name.removeprefix("timm:"), in_chans=in_chans), "drop_path_rate"
    if drop_path is None:
        return build(**kwargs)
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
    try:
        model = build(**kwargs, **{key: drop_path})
    except TypeError as e:
        if key not in str(e):
            raise
        model = None
    if drop_path > 0 and (model is None or not stochastic_depth_rates(model)):
        raise ValueError(f"{name} has no stochastic depth (its constructor takes no {key} or ignores it): "
                         f"use --drop-path 0 with this model")
    return model if model is not None else build(**kwargs)


def stochastic_depth_rates(model: nn.Module) -> list[float]:
    """The non-zero drop rates of the stochastic-depth layers (timm ``DropPath``, torchvision
    ``StochasticDepth``) of ``model``, in module order."""
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    rates = [m.drop_prob if isinstance(m, DropPath) else m.p
             for m in model.modules() if isinstance(m, (DropPath, StochasticDepth))]
    return [float(r) for r in rates if r > 0]


def norm_kind(model: nn.Module) -> str:
    """'bn' for a backbone with batch norms, 'ln' for one with layer norms only, else 'bn' (the
    reference recipe's choice between its BatchNorm and LayerNorm settings)."""
    modules = list(model.modules())
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules):
        return "bn"
    if any(isinstance(m, nn.LayerNorm) for m in modules):
        return "ln"
    return "bn"
