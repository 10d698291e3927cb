"""Hand pre-trained encoders to torchvision's detection and segmentation models.

Weights exported by sparkmim carry the original model's keys. timm ResNets use torchvision's own
names, so they load directly; timm ConvNeXts are renamed to torchvision's ``features.*`` layout.
Every load is checked key by key and reported (matched / missing / unexpected / shape mismatch).

    from sparkmim.handoff import fasterrcnn
    model, report = fasterrcnn("runs/r50/encoder.safetensors", "resnet50", num_classes=91)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .sources import backbone_weights_of
from .weights import (
    KeyMismatchError,
    atomic_write,
    key_report,
    mismatch_message,
    mismatches,
    state_bytes,
)

__all__ = ["to_torchvision", "timm_convnext_to_torchvision", "detection_backbone", "fasterrcnn", "maskrcnn"]

_CONVNEXT_BLOCK = {"conv_dw": "block.0", "norm": "block.2", "mlp.fc1": "block.3", "mlp.fc2": "block.5"}


def timm_convnext_to_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm ConvNeXt state dict to torchvision's ConvNeXt layout (layer scale reshaped to
    ``(C, 1, 1)``; timm's head norm becomes ``classifier.0``)."""
    out = {}
    for k, v in state.items():
        if k.startswith("stem."):
            new = "features.0." + k[len("stem."):]
        elif m := re.match(r"stages\.(\d+)\.downsample\.(\d)\.(.+)", k):
            new = f"features.{2 * int(m[1])}.{m[2]}.{m[3]}"
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)$", k):
            part = _CONVNEXT_BLOCK.get(m[3])
            if part is None:
                raise KeyMismatchError(f"no torchvision counterpart for timm ConvNeXt key '{k}'")
            new = f"features.{2 * int(m[1]) + 1}.{m[2]}.{part}.{m[4]}"
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.gamma$", k):
            new, v = f"features.{2 * int(m[1]) + 1}.{m[2]}.layer_scale", v.reshape(-1, 1, 1)
        elif k.startswith("head.norm."):
            new = "classifier.0." + k[len("head.norm."):]
        elif k.startswith("head."):
            continue  # a timm classifier; detection needs none
        else:
            raise KeyMismatchError(f"no torchvision counterpart for timm ConvNeXt key '{k}'")
        out[new] = v
    return out


def _is_timm_convnext(state: dict[str, Tensor]) -> bool:
    return any(k.startswith("stages.") for k in state) and any(k.startswith("stem.") for k in state)


def _classifier_keys(arch: str, keys) -> set[str]:
    prefix = ("fc.",) if arch.startswith(("resnet", "resnext", "wide_resnet")) else ("classifier.2.",)
    return {k for k in keys if k.startswith(prefix)}


def to_torchvision(weights, arch: str, strict: bool = True) -> tuple[nn.Module, dict]:
    """A torchvision classification model ``arch`` (``resnet*`` or ``convnext_*``) holding the
    exported weights, and the key report. The classifier (which SparK does not train) keeps its
    fresh initialisation; with ``strict`` any other missing, unexpected or mis-shaped key raises."""
    import torchvision

    state = weights if isinstance(weights, dict) else backbone_weights_of(weights)
    if _is_timm_convnext(state):
        state = timm_convnext_to_torchvision(state)
    model = torchvision.models.get_model(arch, weights=None)
    report = key_report(model, state)
    allowed = _classifier_keys(arch, model.state_dict())
    report["missing"] = [k for k in report["missing"] if k not in allowed]
    report["classifier_kept"] = sorted(k for k in allowed if k not in state)
    if strict and mismatches(report):
        raise KeyMismatchError(mismatch_message(f"weights do not fit torchvision {arch}", report))
    model.load_state_dict({k: state[k] for k in report["matched"]}, strict=False)
    return model, report


def detection_backbone(weights, arch: str = "resnet50", trainable_layers: int = 5, norm_layer=None,
                       out_channels: int = 256, strict: bool = True):
    """An FPN backbone (torchvision ``BackboneWithFPN``) built from exported weights, and the key
    report. ResNets use torchvision's ``resnet_fpn_backbone`` (``FrozenBatchNorm2d`` unless another
    ``norm_layer`` is given); ConvNeXts feed their four stages to the FPN."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
    from torchvision.ops import misc

    if arch.startswith("convnext"):
        model, report = to_torchvision(weights, arch, strict)
        stages = [1, 3, 5, 7]  # torchvision ConvNeXt: stem, then stages with downsamples between them
        channels = [model.features[i][0].block[0].in_channels for i in stages]
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        frozen = 0 if trainable_layers == 5 else 2 * (4 - trainable_layers) + 1  # from the stem up
        for m in list(model.features)[:frozen]:
            m.requires_grad_(False)
        backbone = BackboneWithFPN(model.features, {str(i): str(n) for n, i in enumerate(stages)}, channels,
                                   out_channels)
        return backbone, report
    if not arch.startswith(("resnet", "resnext", "wide_resnet")):
        raise ValueError(f"detection hand-off supports torchvision resnet*/resnext*/wide_resnet* and convnext_*, not {arch}")
    import torchvision

    norm_layer = norm_layer or misc.FrozenBatchNorm2d
    resnet = torchvision.models.get_model(arch, weights=None, norm_layer=norm_layer)
    loaded, report = to_torchvision(weights, arch, strict)
    resnet.load_state_dict(loaded.state_dict(), strict=False)  # FrozenBatchNorm2d drops num_batches_tracked
    return _resnet_fpn_extractor(resnet, trainable_layers), report


def _detector(cls, weights, arch: str, num_classes: int, kwargs: dict):
    bb_kw = {k: kwargs.pop(k) for k in ("trainable_layers", "norm_layer", "strict") if k in kwargs}
    backbone, report = detection_backbone(weights, arch, **bb_kw)
    return cls(backbone, num_classes=num_classes, **kwargs), report


def fasterrcnn(weights, arch: str = "resnet50", num_classes: int = 91, **kwargs):
    """torchvision Faster R-CNN with an FPN backbone from exported weights; ``(model, key report)``."""
    from torchvision.models.detection import FasterRCNN

    return _detector(FasterRCNN, weights, arch, num_classes, kwargs)


def maskrcnn(weights, arch: str = "resnet50", num_classes: int = 91, **kwargs):
    """torchvision Mask R-CNN (instance segmentation) with an FPN backbone from exported weights."""
    from torchvision.models.detection import MaskRCNN

    return _detector(MaskRCNN, weights, arch, num_classes, kwargs)


def save_torchvision(weights, arch: str, out: str | Path) -> dict:
    """Write a complete state dict of torchvision ``arch`` (``torch.save``): the exported weights
    under torchvision's keys, and the classifier (which SparK does not train) at its fresh
    initialisation, listed in the report as ``classifier_kept``; so the file loads with
    ``strict=True`` into ``torchvision.models.get_model(arch)``. Returns the report."""
    model, report = to_torchvision(weights, arch, strict=True)
    state = model.state_dict()
    atomic_write(out, lambda tmp: torch.save(state, tmp), state_bytes(state))
    return report
