"""Command line: options, YAML recipes and overrides, clear errors, export / reconstruct / models."""

import json
import re
import warnings
from dataclasses import fields

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from conftest import write_noise_images
from sparkmim.checkpoint import checkpoint_paths
from sparkmim.cli import RECIPES, build_parser, main
from sparkmim.config import ConfigError, PretrainConfig, load_config
from sparkmim.modality import modality_for
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
    """``auto`` (the default) picks channels-last on CUDA and contiguous maps on CPU for images,
    contiguous volumes everywhere (not measured for them); ``true`` gives the modality's
    channels-last format; YAML booleans and flag values both work; anything else is refused."""
    import torch

    from sparkmim.modality import IMAGES, VOLUMES

    last, plain, last_3d = torch.channels_last, torch.contiguous_format, torch.channels_last_3d
    assert load_config().channels_last == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (IMAGES.memory_format("auto", cpu), IMAGES.memory_format("auto", cuda)) == (plain, last)
    assert (VOLUMES.memory_format("auto", cuda), VOLUMES.memory_format("true", cpu)) == (plain, last_3d)
    path = tmp_path / "c.yaml"
    for value, want in ((True, last), (False, plain)):
        path.write_text(yaml.safe_dump({"channels_last": value}))
        assert IMAGES.memory_format(load_config(path).channels_last, cuda if want is plain else cpu) == want
    args = build_parser().parse_args(["pretrain", "--channels-last", "true"])
    from sparkmim.config import config_from_args

    assert IMAGES.memory_format(config_from_args(args).channels_last, cpu) == last
    with pytest.raises(ConfigError, match="channels_last must be one of auto, true, false, got .sometimes."):
        load_config(None, {"channels_last": "sometimes"})


@pytest.mark.parametrize("argv,message", [
    (["--data", "/no/such/folder"], "does not exist"),
    (["--input-size", "72"], "--input-size 72 is not a multiple of resnet10t's total stride 32; try --input-size 64"),
    (["--model", "resnet5O"], "unknown timm model 'resnet5O'; did you mean"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--model", "vgg11", "--drop-path", "0.1"], "vgg11 has no stochastic depth"),
    (["--drop-path", "1"], "--drop-path must be in [0, 1)"),
    (["--clip-grad", "-1"], "--clip-grad must be >= 0"),
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
    from safetensors.torch import load_file

    as_pth, as_safetensors = torch.load(tmp_path / "enc.pth", weights_only=True), load_file(tmp_path / "enc.safetensors")
    final = torch.load(checkpoint_paths(out)[-1], weights_only=True)["model"]
    assert as_pth.keys() == as_safetensors.keys() and all(torch.equal(as_pth[k], as_safetensors[k]) for k in as_pth)
    assert all(torch.equal(v, final[f"encoder.model.{k}"]) for k, v in as_pth.items())  # the run's last weights
    grid = tmp_path / "grid.png"
    files = [str(p) for p in sorted(images.glob("*.jpg"))[:3]]
    assert main(["reconstruct", str(out), *files, "--out", str(grid)]) == 0
    w, h = Image.open(grid).size
    assert w > 3 * 64 and h > 3 * 64
    panorama = tmp_path / "panorama.png"  # 3000 x 200: shown 15:1 (960 x 64), not squeezed into a square
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 3000, 3), dtype=np.uint8)).save(panorama)
    assert main(["reconstruct", str(out), str(panorama), "--out", str(grid)]) == 0
    shown = np.asarray(Image.open(grid).convert("RGB"))
    coloured = np.nonzero((shown != 255).any(axis=-1).any(axis=0))[0]  # columns holding tile pixels
    runs = np.split(coloured, np.nonzero(np.diff(coloured) > 1)[0] + 1)
    tiles = [r for r in runs if len(r) > 100]
    assert [len(t) for t in tiles] == [960, 960, 960], [len(r) for r in runs]
    filled = (shown[:, tiles[0]] != 255).any(axis=-1).mean(axis=1) > 0.5  # rows the tile fills (not the title)
    assert filled.sum() == 64
    import nibabel as nib

    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(scan))
    assert main(["reconstruct", str(out), str(scan), "--out", str(grid)]) == 2
    assert "scan.nii.gz is a volume, and resnet10t is a 2-D model that takes images" in capsys.readouterr().err
    assert main(["models", "--filter", "ConvNeXt"]) == 0
    listed = capsys.readouterr().out
    assert "timm:convnext_atto" in listed and "torchvision:convnext_tiny" not in listed


def test_init_from_exported_weights_is_strict(images, tmp_path, capsys):
    """``--init encoder.safetensors`` starts the backbone from the file: after a run at a negligible
    lr (1e-30: no weight moves by a float32 step) every parameter of the checkpoint's encoder equals
    the file's. Weights of another architecture are refused saying first which one the file holds."""
    from safetensors.torch import load_file

    out = tmp_path / "first"
    assert main(["pretrain", *TINY, "--data", str(images), "--out", str(out)]) == 0
    capsys.readouterr()
    second = [*TINY, "--data", str(images), "--out", str(tmp_path / "second"), "--lr", "1e-30", "--seed", "7"]
    assert main(["pretrain", *second, "--init", str(out / "encoder.safetensors")]) == 0
    assert '"event": "init"' in capsys.readouterr().out
    given = load_file(str(out / "encoder.safetensors"))
    saved = torch.load(checkpoint_paths(tmp_path / "second")[-1], weights_only=True)["model"]
    params = dict(timm.create_model("resnet10t", num_classes=0).named_parameters())
    assert params and all(torch.equal(saved[f"encoder.model.{k}"], given[k]) for k in params)
    third = [*TINY, "--data", str(images), "--out", str(tmp_path / "third")]
    assert main(["pretrain", *third, "--model", "resnet18", "--init", str(out / "encoder.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"--init {out / 'encoder.safetensors'} holds resnet10t weights and the model is resnet18" in err, err
    assert "weights do not match the model" in err and "missing" in err


def test_a_mistyped_flag_gets_the_subcommands_usage_and_a_suggestion(capsys):
    for command, typo, want in (("pretrain", "--batch-sise", "--batch-size"), ("evaluate", "--weigths", "--weights"),
                                ("export", "--formt", "--format")):
        with pytest.raises(SystemExit) as exit_:
            main([command, *(["knn"] if command == "evaluate" else ["run"] if command == "export" else []), typo, "4"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2
        assert f"usage: sparkmim {command}" in err and f"sparkmim {command}: error: unrecognized arguments" in err, err
        assert f"did you mean {want}" in err, err


def test_errors_name_the_flag_typed_or_the_recipe_key(images, tmp_path, capsys):
    """An option given as a flag is named as the flag; one set in a YAML file keeps its key; the
    Python API names keyword arguments."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"warmup_epochs": -1}))
    assert main(["pretrain", "--batch-size", "0", "--data", str(images)]) == 2
    assert "error: --batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(recipe), "--data", str(images)]) == 2
    assert "error: warmup_epochs must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="^batch_size must be >= 1, got 0$"):
        load_config(None, {"batch_size": 0})


def test_evaluate_takes_the_model_and_input_from_the_run(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(images), "--out", str(out), "--in-chans", "1"]) == 0
    labelled = tmp_path / "labelled"
    for name in ("a", "b"):
        (labelled / name).mkdir(parents=True)
        write_noise_images(labelled / name, 4, (40, 40), seed=len(name))
    capsys.readouterr()
    assert main(["evaluate", "knn", "--data", str(labelled), "--weights", f"random,{out}", "--k", "1", "--workers", "0",
                 "--progress", "false", "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    taken = json.loads(next(line for line in printed.splitlines() if '"event": "settings"' in line))
    assert (taken["model"], taken["in_chans"], taken["input_size"]) == ("resnet10t", 1, 64)
    config = json.loads((tmp_path / "eval" / "results.json").read_text())["config"]
    assert (config["model"], config["in_chans"], config["input_size"]) == ("resnet10t", 1, 64)


def test_a_run_says_what_its_checkpoints_cost_and_warns_of_a_tiny_lr(images, tmp_path, capsys):
    """The start event gives the size of one checkpoint and of those kept; the paper's lr rule at
    batch 4 gives a peak lr of 3e-6, which is named with the ways to raise it; a 64 px crop of a
    stride-32 encoder has a 2 x 2 mask grid, called too coarse with the ways to refine it; export
    says which files it replaces."""
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as caught:
        assert main(["pretrain", *TINY, "--data", str(images), "--out", str(out)]) == 0
    said = [str(w.message) for w in caught]
    assert any(re.search(r"the peak lr 3.13e-06 .* raise the effective batch with --accum-steps, set --lr", m)
               for m in said), said
    coarse = [m for m in said if m.startswith("the mask grid")]
    assert len(coarse) == 1 and coarse[0].startswith("the mask grid is 2x2 (4 patches of 32x32, 2 visible)")
    assert "larger crop (--input-size)" in coarse[0] and "--feature-modules" in coarse[0] and "e.g. 16x16" in coarse[0]
    start = json.loads(next(line for line in capsys.readouterr().out.splitlines() if '"event": "start"' in line))
    size = (out / checkpoint_paths(out)[-1].name).stat().st_size
    assert abs(start["checkpoint_mib"] * 2**20 - size) < 0.02 * size and start["checkpoints_mib"] >= start["checkpoint_mib"]
    with pytest.warns(UserWarning, match=f"replacing the existing {out / 'encoder.safetensors'}"):
        assert main(["export", str(out)]) == 0


def test_fewer_decoded_stages_give_a_finer_mask_grid(images, tmp_path, capsys):
    """``--feature-modules layer1,layer2,layer3``: the patch is layer3's stride (16), so a 64 px crop
    has a 4 x 4 grid; layer4 reaches no decoded map and is left out of training; the export still
    loads strictly; resuming with other feature modules is refused."""
    out = tmp_path / "run"
    argv = ["pretrain", *TINY, "--data", str(images), "--out", str(out), "--feature-modules", "layer1,layer2,layer3"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert not [w for w in caught if str(w.message).startswith("the mask grid")]  # 4 x 4 is fine
    start = json.loads(next(line for line in capsys.readouterr().out.splitlines() if '"event": "start"' in line))
    assert start["strides"] == [[4, 4], [8, 8], [16, 16]]
    state = torch.load(checkpoint_paths(out)[-1], weights_only=True)
    assert state["config"]["feature_modules"] == "layer1,layer2,layer3"
    load_encoder_weights(timm.create_model("resnet10t", num_classes=0), out / "encoder.safetensors", strict=True)
    from sparkmim.train.setup import build_model

    cfg = load_config(None, state["config"])
    unused = build_model(cfg, modality_for(cfg.model)).unused_parameters()
    assert "encoder.model.layer4.0.conv1.weight" in unused and not any("layer3" in k for k in unused)
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--resume", "auto", "--feature-modules", "layer1,layer2"]) == 2
    err = capsys.readouterr().err
    assert (f"cannot resume the run in {out} with --feature-modules layer1,layer2: it was started with "
            f"--feature-modules layer1,layer2,layer3" in err), err
