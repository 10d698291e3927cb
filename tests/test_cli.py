"""Command line: options, YAML recipes and overrides, clear errors, export / reconstruct / models."""

from dataclasses import fields

import pytest
import timm
import yaml
from PIL import Image

from conftest import write_noise_images
from sparkmim.cli import RECIPES, build_parser, main
from sparkmim.config import ConfigError, PretrainConfig, load_config
from sparkmim.weights import load_encoder_weights

TINY = ["--model", "resnet10t", "--input-size", "64", "--decoder-width", "32", "--batch-size", "4",
        "--workers", "0", "--epochs", "1", "--tensorboard", "false", "--progress", "false", "--log-every-steps", "1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_noise_images(tmp_path_factory.mktemp("imgs"), 8, (70, 90), seed=1, suffix=".jpg")


def test_every_option_is_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for f in fields(PretrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "(default: 0.6)" in text and "--config" in text


def test_yaml_recipes_load_and_flags_override(tmp_path):
    for recipe in RECIPES.glob("*.yaml"):
        load_config(recipe)  # every shipped recipe is valid
    assert {p.stem for p in RECIPES.glob("*.yaml")} >= {"demo", "resnet50", "convnext_small", "one_gpu"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "convnext_atto", "epochs": 5, "mask_ratio": 0.75}))
    args = build_parser().parse_args(["pretrain", "--config", str(path), "--epochs", "7", "--hierarchical", "false"])
    from sparkmim.config import config_from_args

    cfg = config_from_args(args)
    assert (cfg.model, cfg.epochs, cfg.mask_ratio, cfg.hierarchical) == ("convnext_atto", 7, 0.75, False)
    path.write_text(yaml.safe_dump({"mask_ration": 0.5}))
    with pytest.raises(ConfigError, match="mask_ration .did you mean mask_ratio"):
        load_config(path)
    with pytest.raises(ConfigError, match="mask_ratio must be in"):
        load_config(None, {"mask_ratio": 1.5})


def test_channels_last_is_auto_true_or_false(tmp_path):
    """``auto`` (the default) picks channels-last on CUDA and contiguous maps on CPU; YAML
    booleans and flag values both work; anything else is refused."""
    import torch

    from sparkmim.train.setup import resolve_channels_last

    assert load_config().channels_last == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (resolve_channels_last("auto", cpu), resolve_channels_last("auto", cuda)) == (False, True)
    path = tmp_path / "c.yaml"
    for value, want in ((True, True), (False, False)):
        path.write_text(yaml.safe_dump({"channels_last": value}))
        assert resolve_channels_last(load_config(path).channels_last, cuda if not want else cpu) is want
    args = build_parser().parse_args(["pretrain", "--channels-last", "true"])
    from sparkmim.config import config_from_args

    assert resolve_channels_last(config_from_args(args).channels_last, cpu) is True
    with pytest.raises(ConfigError, match="channels_last must be one of auto, true, false, got .sometimes."):
        load_config(None, {"channels_last": "sometimes"})


@pytest.mark.parametrize("argv,message", [
    (["--data", "/no/such/folder"], "does not exist"),
    (["--input-size", "72"], "not a multiple of resnet10t's total stride 32; try 64"),
    (["--model", "resnet5O"], "unknown timm model 'resnet5O'; did you mean"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--model", "vgg11", "--drop-path", "0.1"], "vgg11 has no stochastic depth"),
    (["--drop-path", "1"], "drop_path must be in [0, 1)"),
    (["--clip-grad", "-1"], "clip_grad must be >= 0"),
])
def test_errors_say_what_to_do(argv, message, images, tmp_path, capsys):
    base = [*TINY, "--data", str(images), "--out", str(tmp_path / "o")]
    assert main(["pretrain", *base, *argv]) == 2
    assert message in capsys.readouterr().err


def test_export_reconstruct_and_models(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(images), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "enc.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert '"strict_load": "ok"' in printed and '"missing": []' in printed
    load_encoder_weights(timm.create_model("resnet10t", num_classes=0), tmp_path / "enc.safetensors", strict=True)
    assert main(["export", str(out), "--format", "pth", "--out", str(tmp_path / "enc.pth")]) == 0
    grid = tmp_path / "grid.png"
    files = [str(p) for p in sorted(images.glob("*.jpg"))[:3]]
    assert main(["reconstruct", str(out), *files, "--out", str(grid)]) == 0
    w, h = Image.open(grid).size
    assert w > 3 * 64 and h > 3 * 64
    assert main(["models", "--filter", "ConvNeXt"]) == 0
    listed = capsys.readouterr().out
    assert "timm:convnext_atto" in listed and "torchvision:convnext_tiny" not in listed


def test_init_from_exported_weights_is_strict(images, tmp_path, capsys):
    out = tmp_path / "first"
    assert main(["pretrain", *TINY, "--data", str(images), "--out", str(out)]) == 0
    capsys.readouterr()
    second = [*TINY, "--data", str(images), "--out", str(tmp_path / "second")]
    assert main(["pretrain", *second, "--init", str(out / "encoder.safetensors")]) == 0
    assert '"event": "init"' in capsys.readouterr().out
    third = [*TINY, "--data", str(images), "--out", str(tmp_path / "third")]
    assert main(["pretrain", *third, "--model", "resnet18", "--init", str(out / "encoder.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "weights do not match the model" in err and "missing" in err
