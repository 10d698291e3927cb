"""nnU-Net's networks from plans files, every stage decoded, and checkpoints stock nnU-Net loads
(checked with nnU-Net v2's own network builder and ``load_pretrained_weights``)."""

import json

import numpy as np
import pytest
import torch

from nets3d import plans_dict, write_plans
from sparkmim import SparK, SparseEncoder
from sparkmim.backbones import create_backbone, feature_modules_for
from sparkmim.data import DataError
from sparkmim.nnunet import create_nnunet, nnunet_checkpoint, read_plans

pytest.importorskip("dynamic_network_architectures")


def _nnunet():
    """nnU-Net v2's network builder and pretrained-weights loader (installed with --no-deps)."""
    pytest.importorskip("batchgenerators")
    builder = pytest.importorskip("nnunetv2.utilities.get_network_from_plans")
    loader = pytest.importorskip("nnunetv2.run.load_pretrained_weights")
    return builder.get_network_from_plans, loader.load_pretrained_weights


def nnunets_network(plans, configuration="3d_fullres", in_chans=1, classes=3):
    """The network nnU-Net's trainer builds from a plans file (deep supervision on, as it trains)."""
    get_network_from_plans, _ = _nnunet()
    arch = read_plans(plans, configuration)["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  in_chans, classes, allow_init=True, deep_supervision=True)


@pytest.mark.parametrize("kind", ["anisotropic", "plain"])
def test_a_plans_file_builds_exactly_the_network_nnunet_builds(tmp_path, kind):
    """Same class, keys, shapes and, from the same seed, the same initial weights (nnU-Net's own
    initialisation) as nnU-Net v2's get_network_from_plans; a configuration inheriting from
    3d_fullres builds the same network."""
    plans = write_plans(tmp_path / "nnUNetPlans.json", kind)
    torch.manual_seed(0)
    theirs = nnunets_network(plans, in_chans=2)
    torch.manual_seed(0)
    ours = create_backbone(f"nnunet:{plans}", in_chans=2, num_classes=3)
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "the initial weights differ from nnU-Net's"
    inherited = create_nnunet(f"{plans}:3d_cascade_fullres", 2, 3)
    assert {k: v.shape for k, v in inherited.state_dict().items()} == {k: v.shape for k, v in a.items()}


@pytest.mark.parametrize("kind", ["plain", "anisotropic"])
def test_plans_of_nnunet_before_2_4_are_read_as_nnunet_reads_them(tmp_path, kind):
    """A configuration in the layout before nnU-Net 2.4 (UNet_class_name, pool_op_kernel_sizes, ...):
    nnU-Net's own ConfigurationManager is the oracle. Its rebuilt architecture gives the same class
    and constructor arguments as sparkmim's reading, and nnU-Net's builder, from the same seed, the
    same initial weights, for the plain U-Net and the residual encoder."""
    import pydoc

    from sparkmim.nnunet import _plans_network

    pytest.importorskip("batchgenerators")
    plans_handler = pytest.importorskip("nnunetv2.utilities.plans_handling.plans_handler")
    get_network_from_plans, _ = _nnunet()
    new = plans_dict(kind)
    arch = new["configurations"]["3d_fullres"].pop("architecture")["arch_kwargs"]
    blocks = arch.get("n_conv_per_stage", arch.get("n_blocks_per_stage"))
    new["configurations"]["3d_fullres"].update(
        UNet_class_name=new_name(kind), UNet_base_num_features=4, unet_max_num_features=16,
        n_conv_per_stage_encoder=blocks, n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"],
        conv_kernel_sizes=arch["kernel_sizes"], pool_op_kernel_sizes=arch["strides"], num_pool_per_axis=[3, 3, 3])
    old = tmp_path / "old.json"
    old.write_text(json.dumps(new))
    theirs = plans_handler.PlansManager(json.loads(old.read_text())).get_configuration("3d_fullres")
    their_kwargs = {k: pydoc.locate(v) if k in theirs.network_arch_init_kwargs_req_import and v is not None else v
                    for k, v in theirs.network_arch_init_kwargs.items()}
    cls, kwargs = _plans_network(old, "3d_fullres")
    assert cls.__name__ == theirs.network_arch_class_name.rsplit(".", 1)[1] == new_name(kind)
    assert kwargs == their_kwargs
    torch.manual_seed(0)
    their_net = get_network_from_plans(theirs.network_arch_class_name, theirs.network_arch_init_kwargs,
                                       theirs.network_arch_init_kwargs_req_import, 1, 2, allow_init=True,
                                       deep_supervision=False)
    torch.manual_seed(0)
    ours = create_nnunet(str(old), 1)
    assert type(ours) is type(their_net)
    a, b = ours.state_dict(), their_net.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def new_name(kind: str) -> str:
    return "PlainConvUNet" if kind == "plain" else "ResidualEncoderUNet"


def test_bad_plans_are_refused_in_one_line_naming_what_is_wrong(tmp_path):
    plans = plans_dict("plain")
    plans["configurations"]["evil"] = {"architecture": {**plans["configurations"]["3d_fullres"]["architecture"],
                                                        "network_class_name": "os.system"}}
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(plans))
    cases = [(f"{path}:3d_lowres", r"has no configuration '3d_lowres' \(it has 3d_fullres, 3d_cascade_fullres, evil\)"),
             (f"{path}:evil", "the plans name the network 'os.system'; sparkmim builds only classes of "
                              "dynamic_network_architectures"),
             ("resenc_s", r"unknown nnU-Net network 'resenc_s' \(did you mean nnunet:resenc_m\?\)"),
             (str(tmp_path / "none.json"), "does not exist")]
    for spec, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
            create_nnunet(spec)
        assert "\n" not in str(e.value)


def test_a_2d_configuration_is_refused_by_the_rule_between_name_and_network(tmp_path):
    """nnU-Net's 2d configuration builds a network of 2-D convolutions; an nnU-Net name is read
    as a model of volumes, so the built network is refused by the same rule as any model whose
    convolutions do not match its name, before anything is pre-trained."""
    from sparkmim.config import ConfigError, PretrainConfig
    from sparkmim.modality import modality_for
    from sparkmim.train.setup import build_model

    plans = plans_dict("plain")
    arch = json.loads(json.dumps(plans["configurations"]["3d_fullres"]["architecture"]))
    arch["arch_kwargs"] |= {"conv_op": "torch.nn.modules.conv.Conv2d", "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "kernel_sizes": [[3, 3]] * 4, "strides": [[1, 1], [2, 2], [2, 2], [2, 2]]}
    plans["configurations"]["2d"] = {"data_identifier": "nnUNetPlans_2d", "batch_size": 12, "patch_size": [64, 64],
                                     "spacing": [1.0, 1.0], "architecture": arch}
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(plans))
    network = create_nnunet(f"{path}:2d")  # nnU-Net's own 2-D network, built as nnU-Net builds it
    assert isinstance(network.encoder.stages[0][0].convs[0].conv, torch.nn.Conv2d)
    cfg = PretrainConfig(model=f"nnunet:{path}:2d", in_chans=1, input_size=32, input_depth=32, device="cpu")
    with pytest.raises(ConfigError, match=r"builds a 2-D network \(its first convolution is Conv2d\), and sparkmim "
                                          r"takes .* as a model of volumes \(3-D\)"):
        build_model(cfg, modality_for(cfg.model))


def test_an_anisotropic_plan_decodes_every_stage(tmp_path):
    """Strides (1,2,2), (2,2,2), (1,2,2): all three strided stages are feature maps, and the
    decoder's ladder steps through each (up-sampling the in-plane axes only where the encoder
    strided them only); the prediction has the input's shape."""
    plans = write_plans(tmp_path / "nnUNetPlans.json", "anisotropic")
    names = feature_modules_for(f"nnunet:{plans}")
    assert names == ["encoder.stages.1", "encoder.stages.2", "encoder.stages.3"]
    enc = SparseEncoder(create_backbone(f"nnunet:{plans}", in_chans=1), names)
    assert enc.strides == ((1, 2, 2), (2, 4, 4), (2, 8, 8)) and enc.patch_size == (2, 8, 8)
    model = SparK(enc, decoder_width=32)
    assert model.decoder.factors == [(1, 1, 1), (1, 2, 2), (2, 4, 4)]
    assert model.levels == [0, 1, 2]
    x = torch.randn(2, 1, 8, 32, 32)
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert out.prediction.shape == x.shape and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(enc.model.get_submodule(n).parameters().__next__().grad is not None for n in names)


def test_the_nnunet_export_loads_with_nnunets_own_loader_and_carries_the_runs_encoder(tmp_path):
    """nnU-Net's load_pretrained_weights accepts the checkpoint into the network nnU-Net builds
    from the plans (every key but the segmentation heads, equal shapes); afterwards its encoder,
    also where its decoder holds it, equals the pre-trained encoder, weights and features."""
    _, load_pretrained_weights = _nnunet()
    plans = write_plans(tmp_path / "nnUNetPlans.json", "anisotropic")
    trained = create_backbone(f"nnunet:{plans}", in_chans=2)
    with torch.no_grad():  # stands for pre-training: every encoder tensor changed
        for v in trained.encoder.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v))
    out = tmp_path / "nnunet-3d_fullres.pth"
    report = nnunet_checkpoint(trained.state_dict(), plans, "3d_fullres", 2, out)
    assert report["from_run"] and report["nnunet_init"] and report["seg_layers"]
    assert all(k.startswith(("encoder.", "decoder.encoder.")) for k in report["from_run"])
    network = nnunets_network(plans, in_chans=2, classes=5)
    load_pretrained_weights(network, str(out))
    mine = trained.encoder.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in network.encoder.state_dict().items())
    assert all(torch.equal(v, mine[k]) for k, v in network.decoder.encoder.state_dict().items())
    x = torch.randn(1, 2, 8, 32, 32)
    network.eval(), trained.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(network.encoder(x), trained.encoder(x)))
    assert torch.load(out, weights_only=True)["sparkmim"]["configuration"] == "3d_fullres"  # plain data


def test_an_encoder_that_does_not_fit_the_plans_is_refused_naming_a_key(tmp_path):
    plans = write_plans(tmp_path / "nnUNetPlans.json", "plain")
    two_channels = create_backbone(f"nnunet:{plans}", in_chans=2).state_dict()
    with pytest.raises(ValueError, match=r"encoder.stages.0.0.convs.0.conv.weight is \(4, 2, 3, 3, 3\) in the run, "
                                         r"\(4, 1, 3, 3, 3\) in the plans' network"):
        nnunet_checkpoint(two_channels, plans, "3d_fullres", 1, tmp_path / "x.pth")
    other = write_plans(tmp_path / "other.json", "anisotropic")
    with pytest.raises(ValueError, match="does not fit this nnU-Net network .*export with the plans the run's "
                                         "network came from"):
        nnunet_checkpoint(two_channels, other, "3d_fullres", 2, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


# -- volumes as nnU-Net users keep them ------------------------------------------------------------

def _dataset(root, cases=3, channels=("T2", "ADC"), zooms=(0.8, 0.8, 4.0), shape=(40, 36, 12)):
    """An nnU-Net raw dataset folder: dataset.json, imagesTr/CASE_000C.nii.gz (NIfTI axes i, j, k
    with thick slices along k), a labelsTr folder and an imagesTs case that must not be read."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "imagesTs").mkdir()
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(channels)}, "labels": {"background": 0, "lesion": 1},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    affine = np.diag([*zooms, 1.0])
    arrays = {}
    for c in range(cases):
        for ch in range(len(channels)):
            a = np.zeros(shape, np.float32)
            a[4:-4, 3:-3, 1:-1] = rng.normal(size=(shape[0] - 8, shape[1] - 6, shape[2] - 2)) + 10 * ch
            arrays[(c, ch)] = a
            nib.save(nib.Nifti1Image(a, affine), str(root / "imagesTr" / f"case{c:03d}_{ch:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), affine), str(root / "labelsTr" / f"case{c:03d}.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), affine), str(root / "imagesTs" / "test000_0000.nii.gz"))
    return arrays


def test_an_nnunet_dataset_is_read_one_multichannel_case_at_a_time(tmp_path):
    from sparkmim.volumes import read_nnunet_dataset, read_sample

    arrays = _dataset(tmp_path / "Dataset001_Prostate")
    cases, names = read_nnunet_dataset(tmp_path / "Dataset001_Prostate")
    assert names == ["T2", "ADC"] and len(cases) == 3
    assert [p.name for p in cases[1]] == ["case001_0000.nii.gz", "case001_0001.nii.gz"]
    volume = read_sample(cases[1], 2)
    assert volume.shape == (2, 12, 36, 40)  # (C, D, H, W) = channels, k, j, i
    for ch in range(2):
        assert np.array_equal(volume[ch], arrays[(1, ch)].T)
    (tmp_path / "Dataset001_Prostate" / "imagesTr" / "case002_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case case002 lacks case002_0001.nii.gz \(dataset.json names 2 channels: "
                                        r"T2, ADC\)"):
        read_nnunet_dataset(tmp_path / "Dataset001_Prostate")


def test_foreground_crop_and_spacing_resample_in_physical_units(tmp_path):
    """The box of the non-zero voxels over all channels; resampling a ramp that rises 1 per mm
    along the thick-slice axis gives the same ramp on the new grid (same physical extent)."""
    nib = pytest.importorskip("nibabel")
    from sparkmim.config import parse_spacing
    from sparkmim.volumes import foreground_crop, read_sample

    v = np.zeros((2, 10, 12, 14), np.float32)
    v[0, 2:5, 3:9, 4:6] = np.arange(1, 37, dtype=np.float32).reshape(3, 6, 2)  # each voxel its own value
    v[1, 6, 1, 10] = -2
    assert np.array_equal(foreground_crop(v), v[:, 2:7, 1:9, 4:11])  # the box of both channels, by hand
    assert np.array_equal(foreground_crop(np.zeros((1, 4, 4, 4))), np.zeros((1, 4, 4, 4)))
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32) * 4.0, (16, 8, 10)).copy()  # k: 10 slices of 4 mm
    nib.save(nib.Nifti1Image(ramp, np.diag([1.0, 1.0, 4.0, 1.0])), str(tmp_path / "thick.nii.gz"))
    out = read_sample((tmp_path / "thick.nii.gz",), 1, spacing=parse_spacing("2,1,2"))
    assert out.shape == (1, 19, 8, 8)  # 36 mm: 19 slices of 2 mm; 16 mm across i: 8 voxels of 2 mm
    assert np.allclose(out[0, :, 4, 4], np.arange(19) * 2.0, atol=1e-4)
    np.save(tmp_path / "a.npy", ramp)
    with pytest.raises(ValueError, match="--spacing needs voxel sizes, which only NIfTI files carry"):
        read_sample((tmp_path / "a.npy",), 1, spacing=(1.0, 1.0, 1.0))


def test_pretrain_on_an_nnunet_dataset_and_export_for_nnunet(tmp_path, capsys):
    """The whole path: ``sparkmim pretrain --model nnunet:PLANS --data DATASET`` (two channels,
    thick slices resampled, foreground crop), then ``sparkmim export RUN --nnunet PLANS``, which
    nnU-Net's own loader accepts into the network nnU-Net builds; the loaded encoder equals the
    run's exported encoder."""
    from safetensors.torch import load_file

    from sparkmim.cli import main

    _, load_pretrained_weights = _nnunet()
    _dataset(tmp_path / "Dataset001_Prostate")
    plans = write_plans(tmp_path / "nnUNetPlans.json", "anisotropic")
    run = tmp_path / "run"
    common = ["--model", f"nnunet:{plans}", "--data", str(tmp_path / "Dataset001_Prostate"), "--out", str(run),
              "--input-size", "32", "--input-depth", "8", "--batch-size", "2", "--epochs", "1", "--workers", "0",
              "--decoder-width", "32", "--device", "cpu", "--progress", "false", "--tensorboard", "false", "--lr", "1e-3",
              "--warmup-epochs", "0"]
    assert main(["pretrain", *common, "--in-chans", "1"]) == 2
    assert "has 2 channel(s) (T2, ADC): use --in-chans 2, not 1" in capsys.readouterr().err
    assert main(["pretrain", "--model", "resnet18", "--in-chans", "2", "--out", str(tmp_path / "r2")]) == 2
    assert "images have 1, 3, 4 channels, got --in-chans 2 (any count is for volumes" in capsys.readouterr().err
    assert main(["pretrain", *common, "--in-chans", "2", "--spacing", "1.6,1.6,2", "--foreground-crop", "true"]) == 0
    assert main(["export", str(run), "--nnunet", str(plans)]) == 0
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["format"] == "nnunet" and event["from_run"] > 0 and event["seg_layers_skipped_by_nnunet"] > 0
    network = nnunets_network(plans, in_chans=2, classes=2)
    load_pretrained_weights(network, event["weights"])
    exported = load_file(str(run / "encoder.safetensors"))
    assert all(torch.equal(v, exported[f"encoder.{k}"]) for k, v in network.encoder.state_dict().items())
    torch.manual_seed(0)  # the run's seed: the network it started from, rebuilt
    initial = create_backbone(f"nnunet:{plans}", in_chans=2, drop_path=0.0).encoder
    moved = [k for k, _ in initial.named_parameters() if not torch.equal(initial.state_dict()[k], exported[f"encoder.{k}"])]
    # nnU-Net's loader took the trained encoder: the run's one step moved the stem and the residual
    # blocks' last norms (nnU-Net starts those at zero, so the step's gradient reaches no other block weight)
    assert "stem.convs.0.conv.weight" in moved and "stages.3.blocks.1.conv2.norm.weight" in moved, moved


def test_volume_options_are_refused_for_images():
    from sparkmim.config import ConfigError, load_config
    from sparkmim.modality import modality_for

    for option, value in (("spacing", "1,1,1"), ("foreground_crop", True)):
        cfg = load_config(None, {"model": "resnet18", option: value})
        with pytest.raises(ConfigError, match=f"--{option.replace('_', '-')} is not for images: resnet18 takes images"):
            modality_for("resnet18").check(cfg)
        modality_for("monai:resnet10").check(load_config(None, {"model": "monai:resnet10", "in_chans": 1, option: value}))
