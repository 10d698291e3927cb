"""Exported encoders in torchvision detection models: key mapping, equal features, a training step."""

import json
import os

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

from sparkmim.cli import main
from sparkmim.handoff import detection_backbone, fasterrcnn, maskrcnn, to_torchvision
from sparkmim.weights import KeyMismatchError, save_encoder_weights


def _exported(name, tmp_path):
    model = timm.create_model(name, num_classes=0).eval()
    return model, save_encoder_weights(model, tmp_path / f"{name}.safetensors")


def _targets():
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 100.0]])
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = 1
    return [{"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}]


def _one_training_step(model):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    losses = model([torch.rand(3, 128, 128)], _targets())
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    torch.optim.SGD(params, lr=0.01).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    return losses


def test_resnet_weights_build_faster_and_mask_rcnn_that_train(tmp_path):
    source, path = _exported("resnet18", tmp_path)
    model, report = fasterrcnn(path, "resnet18", num_classes=3, min_size=128, max_size=128)
    assert report["missing"] == report["unexpected"] == report["shape_mismatch"] == []
    assert report["classifier_kept"] == ["fc.bias", "fc.weight"]
    body = model.backbone.body
    for k, v in source.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(body.state_dict()[k], v), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # FrozenBatchNorm2d folds the statistics: equal up to rounding
        torch.testing.assert_close(body(x)["3"], source.forward_features(x), rtol=1e-4, atol=1e-5)
    losses = _one_training_step(model)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    mask_model, _ = maskrcnn(path, "resnet18", num_classes=3, min_size=128, max_size=128)
    assert "loss_mask" in _one_training_step(mask_model)


def test_timm_convnext_is_renamed_to_torchvision_with_identical_features(tmp_path):
    source, path = _exported("convnext_tiny", tmp_path)
    tv, report = to_torchvision(path, "convnext_tiny")
    assert len(report["matched"]) == len(tv.state_dict()) - 2 and report["classifier_kept"] == [
        "classifier.2.bias", "classifier.2.weight"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval().features(x), source.forward_features(x), rtol=1e-5, atol=1e-6)
    backbone, _ = detection_backbone(path, "convnext_tiny", trainable_layers=3)
    feats = backbone(x)
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert not any(p.requires_grad for p in backbone.body["0"].parameters())  # the stem is frozen
    assert all(p.requires_grad for p in backbone.body["7"].parameters())


def test_weights_of_another_architecture_are_refused_with_a_report(tmp_path):
    _, path = _exported("resnet18d", tmp_path)  # deep stem: not torchvision's resnet18
    with pytest.raises(KeyMismatchError, match="missing .*conv1.weight"):
        to_torchvision(path, "resnet18")


def test_handoff_command_writes_torchvision_keys(tmp_path, capsys):
    _, path = _exported("resnet18", tmp_path)
    out = tmp_path / "tv.pth"
    assert main(["handoff", str(path), "--arch", "resnet18", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["missing"] == [] and line["classifier_kept"] == ["fc.bias", "fc.weight"]
    state = torch.load(out, weights_only=True)
    torchvision.models.resnet18().load_state_dict(state, strict=True)  # complete: the classifier at a fresh init
    exported = load_file(path)
    assert all(torch.equal(state[k], v) for k, v in exported.items())
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask == path.stat().st_mode & 0o777  # like any file
