"""Build backbones by name (timm or torchvision) without their classifiers."""

from __future__ import annotations

import difflib

from torch import nn

__all__ = ["create_timm", "create_torchvision", "create_backbone", "strip_classifier"]


def create_timm(name: str, *, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0, ...)``; unknown names get close suggestions."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown timm model '{name}'{hint}")
    kwargs.setdefault("num_classes", 0)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def strip_classifier(model: nn.Module) -> nn.Module:
    """Replace a torchvision classifier (``fc`` or ``classifier``) by ``nn.Identity``, in place."""
    for attr in ("fc", "classifier"):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
    return model


def create_torchvision(name: str, **kwargs) -> nn.Module:
    """A torchvision classification model (random init unless ``weights`` is given), classifier removed."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown torchvision model '{name}'{hint}")
    kwargs.setdefault("weights", None)
    return strip_classifier(torchvision.models.get_model(name, **kwargs))


def create_backbone(name: str, **kwargs) -> nn.Module:
    """``timm:NAME``, ``torchvision:NAME``, or a bare name (timm first, then torchvision)."""
    if name.startswith("timm:"):
        return create_timm(name[5:], **kwargs)
    if name.startswith("torchvision:"):
        return create_torchvision(name[12:], **kwargs)
    import timm

    if timm.is_model(name):
        return create_timm(name, **kwargs)
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return create_torchvision(name, **kwargs)
    return create_timm(name, **kwargs)  # raises with suggestions
