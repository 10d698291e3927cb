"""The paper's released checkpoints: files of both layouts built from the manifest of the
reference code's files (tests/data/reference_manifest.json.gz: every key and shape, the config,
the optimiser's groups) with random tensors, loaded into sparkmim's model."""

import functools
import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparkmim import SparK, SparseEncoder
from sparkmim.backbones import create_backbone
from sparkmim.config import ConfigError
from sparkmim.released import REFERENCE_BUFFERS, reference_key
from sparkmim.weights import KeyMismatchError, UnsafeFileError, load_encoder_weights, read_weights

MANIFEST = json.loads(gzip.decompress((Path(__file__).parent / "data" / "reference_manifest.json.gz").read_bytes()))
DTYPES = {"float32": torch.float32, "int64": torch.int64}


@functools.cache
def _module(arch: str) -> dict:
    g = torch.Generator().manual_seed(0)
    def draw(key, shape, dtype):
        if dtype != "float32":
            return torch.randint(0, 9, shape, generator=g)
        if key.endswith("running_var"):  # a variance, positive as in a real file (a negative one gives NaN in eval)
            return torch.rand(shape, generator=g) + 0.5
        return torch.randn(shape, generator=g)

    return {k: draw(k, shape, dtype).to(DTYPES[dtype]) for k, (shape, dtype) in MANIFEST[arch]["module"].items()}


@functools.cache
def _moments(arch: str) -> dict:
    entry = MANIFEST[arch]
    names = [n for group in entry["optimizer_groups"] for n in group["params"]]
    g = torch.Generator().manual_seed(1)
    return {i: {"exp_avg": torch.randn(entry["module"][n][0], generator=g),
                "exp_avg_sq": torch.rand(entry["module"][n][0], generator=g)} for i, n in enumerate(names)}


def spark_style(arch: str, optimizer: bool = False, **config) -> dict:
    """A ``_withdecoder_..._spark_style.pth`` of ``arch`` as the reference code writes it (random
    tensors, the same for every call; the optimiser's moments only with ``optimizer``)."""
    entry = MANIFEST[arch]
    module = dict(_module(arch), config={**entry["config"], **config})
    state = _moments(arch) if optimizer else {}
    groups, start = [], 0
    for group in entry["optimizer_groups"]:
        ids = list(range(start, start + len(group["params"])))
        start += len(ids)
        groups.append({"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.19, "grad_averaging": True,
                       "max_grad_norm": 5.0, "trust_clip": False, "always_adapt": False, "step": 1000,
                       "lr_scale": group["lr_scale"], "weight_decay_scale": group["weight_decay_scale"], "params": ids})
    return {"args": "Args(...)", "input_size": 224, "arch": arch, "epoch": 1599, "performance_desc": "[min loss] 0.4",
            "module": module, "optimizer": {"state": state, "param_groups": groups}, "is_pretrain": True}


def timm_style(arch: str) -> dict:
    """A ``_1kpretrained_timm_style.pth``: the encoder alone, the reference backbone's keys."""
    prefix = "sparse_encoder.sp_cnn."
    return {k: _module(arch)[prefix + k] for k in MANIFEST[arch]["timm_style"]}


def sparkmim_model(arch: str, **kw) -> SparK:
    return SparK(SparseEncoder(create_backbone(arch)), **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    paths = {}
    for arch in ("resnet50", "convnext_small"):
        paths[arch] = root / f"{arch}_withdecoder_1kpretrained_spark_style.pth"
        torch.save(spark_style(arch), paths[arch])
        paths[f"{arch}-timm"] = root / f"{arch}_1kpretrained_timm_style.pth"
        torch.save(timm_style(arch), paths[f"{arch}-timm"])
    yield paths
    shutil.rmtree(root, ignore_errors=True)  # 0.6 GB of files: not kept with pytest's last temp folders


@pytest.fixture
def scratch(tmp_path):
    """``tmp_path``, emptied after the test: runs of ResNet-50 write checkpoints of 0.6 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("arch", ["resnet50", "convnext_small"])
def test_every_tensor_of_a_released_file_lands_in_its_place(files, arch):
    """Every tensor but the three constant buffers is loaded, each equal to the file's tensor under
    the key mapping; nothing of the model is left out but timm's ConvNeXt final norm."""
    model = sparkmim_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = model.load_reference(files[arch])
    module = spark_style(arch)["module"]
    assert sorted(report["left_out"]) == sorted(REFERENCE_BUFFERS)
    assert report["kept"] == (["encoder.model.head.norm.weight", "encoder.model.head.norm.bias"]
                              if arch.startswith("convnext") else [])
    own = model.state_dict()
    convnext = arch.startswith("convnext")
    for key, value in module.items():
        if key == "config" or key in REFERENCE_BUFFERS:
            continue
        assert torch.equal(own[reference_key(key, convnext)], value), key
    assert len(report["loaded"]) == len(module) - 1 - len(REFERENCE_BUFFERS) == len(own) - len(report["kept"])
    assert all(torch.equal(own[k], before[k]) for k in report["kept"])


# keys mapped by hand from the manifest (the reference code's names, sparkmim's names)
BY_HAND = {
    "resnet50": [("sparse_encoder.sp_cnn.layer3.4.bn2.running_var", "encoder.model.layer3.4.bn2.running_var"),
                 ("densify_norms.0.running_mean", "densify.0.norm.running_mean"),
                 ("densify_projs.0.weight", "densify.0.proj.weight"),
                 ("mask_tokens.2", "densify.2.mask_token"),
                 ("dense_decoder.dec.1.up_sample.weight", "decoder.blocks.1.up.weight"),
                 ("dense_decoder.dec.4.conv.4.bias", "decoder.blocks.4.conv.4.bias"),
                 ("dense_decoder.proj.weight", "decoder.head.weight")],
    "convnext_small": [("sparse_encoder.sp_cnn.downsample_layers.0.0.weight", "encoder.model.stem.0.weight"),
                       ("sparse_encoder.sp_cnn.downsample_layers.0.1.bias", "encoder.model.stem.1.bias"),
                       ("sparse_encoder.sp_cnn.downsample_layers.2.0.weight", "encoder.model.stages.2.downsample.0.weight"),
                       ("sparse_encoder.sp_cnn.downsample_layers.3.1.weight", "encoder.model.stages.3.downsample.1.weight"),
                       ("sparse_encoder.sp_cnn.stages.2.26.dwconv.weight", "encoder.model.stages.2.blocks.26.conv_dw.weight"),
                       ("sparse_encoder.sp_cnn.stages.1.2.pwconv1.weight", "encoder.model.stages.1.blocks.2.mlp.fc1.weight"),
                       ("sparse_encoder.sp_cnn.stages.0.1.pwconv2.bias", "encoder.model.stages.0.blocks.1.mlp.fc2.bias"),
                       ("sparse_encoder.sp_cnn.stages.3.2.gamma", "encoder.model.stages.3.blocks.2.gamma"),
                       ("sparse_encoder.sp_cnn.stages.3.2.norm.weight", "encoder.model.stages.3.blocks.2.norm.weight"),
                       ("densify_norms.1.weight", "densify.1.norm.weight"),
                       ("densify_projs.3.weight", "densify.3.proj.weight")],
}


_R, _C = "sparse_encoder.sp_cnn.", "encoder.model."
# the deeper layouts, by hand too: a few keys per stage, the blocks the smaller models lack among them
BY_HAND_DEEPER = {
    "resnet101": [(f"{_R}conv1.weight", f"{_C}conv1.weight"), (f"{_R}layer1.2.conv3.weight", f"{_C}layer1.2.conv3.weight"),
                  (f"{_R}layer2.3.bn2.running_mean", f"{_C}layer2.3.bn2.running_mean"),
                  (f"{_R}layer3.22.conv2.weight", f"{_C}layer3.22.conv2.weight"),
                  (f"{_R}layer4.0.downsample.1.running_var", f"{_C}layer4.0.downsample.1.running_var"),
                  ("densify_norms.3.weight", "densify.3.norm.weight"), ("mask_tokens.1", "densify.1.mask_token"),
                  ("dense_decoder.dec.2.up_sample.weight", "decoder.blocks.2.up.weight")],
    "resnet152": [(f"{_R}bn1.bias", f"{_C}bn1.bias"), (f"{_R}layer1.0.downsample.0.weight", f"{_C}layer1.0.downsample.0.weight"),
                  (f"{_R}layer2.7.conv1.weight", f"{_C}layer2.7.conv1.weight"),
                  (f"{_R}layer3.35.bn3.bias", f"{_C}layer3.35.bn3.bias"),
                  (f"{_R}layer4.2.conv3.weight", f"{_C}layer4.2.conv3.weight"),
                  ("densify_projs.1.bias", "densify.1.proj.bias"), ("dense_decoder.proj.weight", "decoder.head.weight")],
    "resnet200": [(f"{_R}layer1.2.bn1.weight", f"{_C}layer1.2.bn1.weight"),
                  (f"{_R}layer2.23.conv2.weight", f"{_C}layer2.23.conv2.weight"),
                  (f"{_R}layer3.35.bn1.running_var", f"{_C}layer3.35.bn1.running_var"),
                  (f"{_R}layer4.1.conv1.weight", f"{_C}layer4.1.conv1.weight"),
                  ("mask_tokens.3", "densify.3.mask_token"), ("dense_decoder.dec.4.conv.1.weight", "decoder.blocks.4.conv.1.weight")],
    **{arch: [(f"{_R}downsample_layers.0.0.weight", f"{_C}stem.0.weight"),
              (f"{_R}downsample_layers.1.0.bias", f"{_C}stages.1.downsample.0.bias"),
              (f"{_R}stages.0.2.pwconv1.bias", f"{_C}stages.0.blocks.2.mlp.fc1.bias"),
              (f"{_R}stages.1.1.norm.bias", f"{_C}stages.1.blocks.1.norm.bias"),
              (f"{_R}stages.2.26.dwconv.weight", f"{_C}stages.2.blocks.26.conv_dw.weight"),
              (f"{_R}stages.3.0.gamma", f"{_C}stages.3.blocks.0.gamma"),
              ("densify_norms.0.bias", "densify.0.norm.bias"), ("dense_decoder.proj.bias", "decoder.head.bias")]
       for arch in ("convnext_base", "convnext_large")},
}


@pytest.mark.parametrize("arch", list(BY_HAND))
def test_hand_mapped_keys_of_the_manifest(files, arch):
    model = sparkmim_model(arch)
    model.load_reference(files[arch])
    module, own = spark_style(arch)["module"], model.state_dict()
    for theirs, ours in BY_HAND[arch]:
        assert torch.equal(own[ours], module[theirs]), (theirs, ours)


def test_a_convnext_block_computes_what_the_reference_block_computes(files):
    """The reference ConvNeXt's block (facebookresearch: depthwise 7x7, channels-last LayerNorm,
    pointwise Linear, GELU, Linear, gamma, residual) and its downsampling layer (channels-first
    LayerNorm, 2x2 convolution), written out with the file's tensors, equal timm's layers after
    the renaming."""
    model = sparkmim_model("convnext_small")
    model.load_reference(files["convnext_small"])
    m = spark_style("convnext_small")["module"]
    p = "sparse_encoder.sp_cnn."
    x = torch.randn(2, 192, 14, 14)

    def ln_first(t, name):  # channels-first LayerNorm of the reference
        return F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), m[name + ".weight"], m[name + ".bias"], 1e-6).permute(0, 3, 1, 2)

    b = f"{p}stages.1.2."
    y = F.conv2d(x, m[b + "dwconv.weight"], m[b + "dwconv.bias"], padding=3, groups=192).permute(0, 2, 3, 1)
    y = F.layer_norm(y, (192,), m[b + "norm.weight"], m[b + "norm.bias"], 1e-6)
    y = F.linear(F.gelu(F.linear(y, m[b + "pwconv1.weight"], m[b + "pwconv1.bias"])), m[b + "pwconv2.weight"],
                 m[b + "pwconv2.bias"])
    reference = x + (m[b + "gamma"] * y).permute(0, 3, 1, 2)
    timm_model = model.encoder.model.eval()
    with torch.no_grad():
        assert torch.allclose(timm_model.stages[1].blocks[2](x), reference, atol=1e-4, rtol=1e-4)
        down = F.conv2d(ln_first(x, f"{p}downsample_layers.2.0"), m[f"{p}downsample_layers.2.1.weight"],
                        m[f"{p}downsample_layers.2.1.bias"], stride=2)
        assert torch.allclose(timm_model.stages[2].downsample(x), down, atol=1e-4, rtol=1e-4)


def test_encoder_only_files_of_both_layouts_load_strictly_into_the_backbone(files):
    """``_timm_style.pth`` (and the encoder of a spark-style file) give the backbone's own keys:
    a strict load into a fresh timm model; ConvNeXt keys renamed, its final norm at identity."""
    for arch in ("resnet50", "convnext_small"):
        for source in (files[f"{arch}-timm"], files[arch]):
            backbone = create_backbone(arch)
            report = load_encoder_weights(backbone, read_weights(source), strict=True)
            assert not report["missing"] and not report["unexpected"]
        weights = read_weights(files[f"{arch}-timm"])
        file = timm_style(arch)
        key = "stages.2.blocks.3.mlp.fc1.weight" if arch.startswith("convnext") else "layer2.1.conv2.weight"
        theirs = "stages.2.3.pwconv1.weight" if arch.startswith("convnext") else key
        assert torch.equal(weights[key], file[theirs])


def test_wrong_files_are_refused_in_one_line_naming_what_is_wrong(tmp_path):
    model = sparkmim_model("resnet50")
    cases = []
    missing = spark_style("resnet50")
    del missing["module"]["dense_decoder.dec.2.conv.1.weight"]
    cases.append((missing, KeyMismatchError, "lacks 1 of this model's tensors, first decoder.blocks.2.conv.1.weight"))
    extra = spark_style("resnet50")
    extra["module"]["dense_decoder.dec.5.up_sample.weight"] = torch.zeros(3)
    cases.append((extra, KeyMismatchError, r"dense_decoder.dec.5.up_sample.weight has no place in this model "
                                           r"\(as decoder.blocks.5.up.weight\)"))
    shape = spark_style("resnet50")
    shape["module"]["densify_projs.1.weight"] = torch.zeros(384, 1024, 1, 1)
    cases.append((shape, KeyMismatchError, r"densify_projs.1.weight is \(384, 1024, 1, 1\), this model's "
                                           r"densify.1.proj.weight is \(384, 1024, 3, 3\)"))
    cases.append((spark_style("resnet50", **{"dense_decoder.width": 512}), ConfigError,
                  "trained with dense_decoder.width 512, this model has 768 \\(--decoder-width\\)"))
    cases.append((spark_style("resnet50", densify_norm_str="ln"), ConfigError,
                  "trained with densify_norm_str 'ln', this model has 'bn' \\(--densify-norm\\)"))
    for state, error, message in cases:
        with pytest.raises(error, match=message) as e:
            model.load_reference(state)
        assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match=r"trained with mask_ratio 0.75, this run uses 0.6 \(--mask-ratio\)"):
        model.load_reference(spark_style("resnet50", mask_ratio=0.75))
    with pytest.warns(UserWarning, match=r"sparse_encoder.input_size 224, this run uses 192 \(--input-size\)"):
        model.load_reference(spark_style("resnet50"), input_size=192)


def test_a_file_holding_python_objects_is_refused_not_run(scratch):
    state = spark_style("resnet50")
    state["args"] = Path("/tmp")  # an object: loading it would run code
    torch.save(state, scratch / "bad.pth")
    with pytest.raises(UnsafeFileError, match="holds Python objects"):
        sparkmim_model("resnet50").load_reference(scratch / "bad.pth")


def test_the_lamb_moments_map_through_the_reference_optimizer_order():
    """The released optimiser state is keyed by position across the reference code's parameter
    groups (the manifest's order): each moment lands on the parameter of that name."""
    from sparkmim.released import optimizer_names, reference_moments

    for arch in ("resnet50", "convnext_small"):
        state = spark_style(arch, optimizer=True)
        names = optimizer_names(arch)
        assert names == [n for g in MANIFEST[arch]["optimizer_groups"] for n in g["params"]]
        model = sparkmim_model(arch)
        moments, steps = reference_moments(state, model)
        assert steps == 1000 and len(moments) == len(names) == sum(p.requires_grad for p in model.parameters()) - (
            2 if arch.startswith("convnext") else 0)
        for theirs, ours in BY_HAND[arch]:
            if theirs in names:
                i = names.index(theirs)
                assert torch.equal(moments[ours][0], state["optimizer"]["state"][i]["exp_avg"])
                assert torch.equal(moments[ours][1], state["optimizer"]["state"][i]["exp_avg_sq"])


def _run(tmp_path, *extra):
    from sparkmim.cli import main

    return main(["pretrain", "--model", "resnet50", "--input-size", "64", "--batch-size", "2", "--data", "demo", "--demo-length", "4",
                 "--workers", "0", "--device", "cpu", "--progress", "false", "--tensorboard", "false",
                 "--vis-every-epochs", "0", "--out", str(tmp_path / "run"), *extra])


def test_init_from_a_released_file_starts_from_its_whole_model(files, scratch, capsys):
    """``--init FILE`` with a spark-style file: the run starts from the file's encoder, densify
    and decoder (at lr 1e-12 the trained weights stay the file's), and says which kind it found."""
    from sparkmim.checkpoint import checkpoint_paths, read_checkpoint

    assert _run(scratch, "--init", str(files["resnet50"]), "--epochs", "1", "--lr", "1e-12",
                "--warmup-epochs", "0") == 0
    init = next(json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event": "init"' in line)
    assert init["kind"].startswith("reference SparK model") and init["loaded_keys"] == 422
    assert sorted(init["left_out"]) == sorted(REFERENCE_BUFFERS)
    saved = read_checkpoint(checkpoint_paths(scratch / "run")[-1])["model"]
    module = spark_style("resnet50")["module"]
    for theirs, ours in [("dense_decoder.dec.0.conv.0.weight", "decoder.blocks.0.conv.0.weight"),
                         ("densify_projs.2.weight", "densify.2.proj.weight"), ("mask_tokens.1", "densify.1.mask_token"),
                         ("sparse_encoder.sp_cnn.layer4.2.conv3.weight", "encoder.model.layer4.2.conv3.weight")]:
        assert torch.allclose(saved[ours], module[theirs], atol=1e-6), ours
    assert _run(scratch / "c", "--init", str(files["convnext_small"]), "--epochs", "1") == 2
    assert "is a SparK checkpoint of convnext_small, the run's backbone is resnet50: use --model convnext_small" in \
        capsys.readouterr().err


def test_resume_from_a_released_file_continues_its_run(scratch, capsys):
    """``--resume FILE``: the file's weights, LAMB moments and step count, and its epoch: the run
    goes on at epoch 1600 (the file ends epoch 1599) at that place of its own schedule; LAMB's
    step count goes on from the file's (1000 -> 1002 after two steps)."""
    from sparkmim.checkpoint import checkpoint_paths, read_checkpoint

    path = scratch / "resnet50_withdecoder_1kpretrained_spark_style.pth"
    torch.save(spark_style("resnet50", optimizer=True), path)
    assert _run(scratch, "--resume", str(path), "--epochs", "1600") == 2
    assert "ended its run at epoch 1600; --epochs 1600 leaves nothing to continue" in capsys.readouterr().err
    assert _run(scratch, "--resume", str(path), "--epochs", "1601", "--lr", "1e-3") == 0
    out = capsys.readouterr().out
    event = next(json.loads(line) for line in out.splitlines() if '"kind": "reference SparK run"' in line)
    assert event["epoch"] == 1600 and event["step"] == 3200 and event["optimizer_moments"] == 221
    assert event["optimizer_steps"] == 1000
    saved = read_checkpoint(checkpoint_paths(scratch / "run")[-1])
    assert saved["epoch"] == 1601 and saved["step"] == 3202
    assert [float(g["step"]) for g in saved["optimizer"]["param_groups"]] == [1002.0, 1002.0]


def test_export_and_evaluate_take_both_released_layouts(files, scratch, capsys):
    """``sparkmim export FILE`` writes the encoder of a spark-style file (its architecture read
    from it) or of a timm-style file (``--model``) with timm's keys, and ``evaluate --weights``
    reads both (weights_state): each loads strictly into a fresh backbone."""
    from sparkmim.checkpoint import weights_state
    from sparkmim.cli import main

    assert main(["export", str(files["convnext_small"]), "--out", str(scratch / "a.safetensors")]) == 0
    assert '"model": "convnext_small"' in capsys.readouterr().out
    assert main(["export", str(files["resnet50-timm"])]) == 2
    assert "is an encoder-only weights file: name its backbone, e.g. --model resnet50" in capsys.readouterr().err
    assert main(["export", str(files["resnet50-timm"]), "--model", "resnet50", "--out", str(scratch / "b.pth")]) == 0
    for out, arch, source in [(scratch / "a.safetensors", "convnext_small", files["convnext_small"]),
                              (scratch / "b.pth", "resnet50", files["resnet50-timm"])]:
        exported, evaluated = read_weights(out), weights_state(source)
        assert exported.keys() == evaluated.keys()
        assert all(torch.equal(v, evaluated[k]) for k, v in exported.items())
        load_encoder_weights(create_backbone(arch), exported, strict=True)
    # the file's tensors, at the keys mapped by hand
    module = spark_style("convnext_small")["module"]
    assert torch.equal(read_weights(scratch / "a.safetensors")["stages.2.blocks.26.conv_dw.weight"],
                       module["sparse_encoder.sp_cnn.stages.2.26.dwconv.weight"])
    assert torch.equal(read_weights(scratch / "b.pth")["layer3.4.bn2.running_var"],
                       timm_style("resnet50")["layer3.4.bn2.running_var"])
    assert (scratch / "timm" / "config.json").is_file()  # a timm model folder beside it, as for runs


def test_init_pretrained_starts_from_the_backbones_own_weights(tmp_path, capsys):
    """``--init pretrained`` loads the backbone's published weights through timm's loader (here a
    local timm model folder, ``local-dir:``, as nothing can be downloaded in the tests); the
    decoder starts fresh. MONAI and nnU-Net networks have none to load."""
    from sparkmim.checkpoint import checkpoint_paths, read_checkpoint
    from sparkmim.cli import main
    from sparkmim.weights import save_timm_folder

    torch.manual_seed(3)
    published = create_backbone("resnet18")
    save_timm_folder(published, tmp_path / "resnet18", mean=(0.5,) * 3, std=(0.25,) * 3, input_size=224)
    common = ["--input-size", "64", "--batch-size", "2", "--data", "demo", "--demo-length", "4", "--workers", "0", "--device", "cpu",
              "--progress", "false", "--tensorboard", "false", "--vis-every-epochs", "0", "--epochs", "1",
              "--init", "pretrained"]
    assert main(["pretrain", "--model", f"local-dir:{tmp_path / 'resnet18'}", "--lr", "1e-12", "--warmup-epochs", "0",
                 "--out", str(tmp_path / "run"), *common]) == 0
    assert '"kind": "the backbone\'s own published weights' in capsys.readouterr().out
    saved = read_checkpoint(checkpoint_paths(tmp_path / "run")[-1])["model"]
    for key in ("conv1.weight", "layer3.1.conv2.weight", "layer4.0.downsample.0.weight"):
        assert torch.allclose(saved[f"encoder.model.{key}"], published.state_dict()[key], atol=1e-6), key
    assert main(["pretrain", "--model", "monai:resnet10", "--in-chans", "1", "--out", str(tmp_path / "m"), *common]) == 2
    assert "monai:resnet10 has no published pretrained weights that sparkmim can load" in capsys.readouterr().err


@pytest.mark.parametrize("arch", sorted(MANIFEST))
def test_every_released_layout_maps_onto_sparkmims_model(arch):
    """All seven released architectures (ResNet-50 to 200, ConvNeXt-S, B, L): every key of the
    manifest has a place of the same shape in sparkmim's model of that backbone, built on the
    meta device (no memory), the keys mapped by hand (a few per stage) land where they were
    written, and no tensor of the model is left out but timm's ConvNeXt final norm; the LAMB
    state names every trained parameter."""
    from sparkmim.released import map_reference, optimizer_names

    with torch.device("meta"):
        model = SparK(SparseEncoder(create_backbone(arch)))
    module = {k: torch.empty(shape, dtype=DTYPES[dtype], device="meta")
              for k, (shape, dtype) in MANIFEST[arch]["module"].items()}
    module["config"] = MANIFEST[arch]["config"]
    mapped, report = map_reference(module, model)
    for theirs, ours in {**BY_HAND, **BY_HAND_DEEPER}[arch]:  # by hand: the file's tensor placed at our key
        assert mapped.get(ours) is module[theirs], (theirs, ours)
    assert len(mapped) == len(module) - 1 - len(REFERENCE_BUFFERS)
    assert report["kept"] == (["encoder.model.head.norm.weight", "encoder.model.head.norm.bias"]
                              if arch.startswith("convnext") else [])
    convnext = arch.startswith("convnext")
    trained = {n for n, p in model.named_parameters() if not n.startswith("encoder.model.head.norm.")}
    assert {reference_key(n, convnext) for n in optimizer_names(arch)} == trained
