"""`sparkmim pretrain` on volumes: a MONAI 3-D ResNet on a folder of NIfTI, .npy and TIFF files
with a corrupt one; strict export, reconstruction images, exact resume, clear errors."""

import gzip
import json
import shutil

import numpy as np
import pytest
import torch

from sparkmim.backbones import create_backbone
from sparkmim.checkpoint import checkpoint_paths
from sparkmim.cli import main
from sparkmim.config import load_config
from sparkmim.train import pretrain
from sparkmim.weights import load_encoder_weights

nib = pytest.importorskip("nibabel")
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("monai")

TINY3D = dict(model="monai:resnet10", in_chans=1, input_size=32, input_depth=16, batch_size=2, epochs=2,
              warmup_epochs=0.5, decoder_width=32, workers=0, progress=False, tensorboard=False, log_every_steps=1,
              vis_every_epochs=1, device="cpu", lr=1e-3)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    (root / "mri").mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(rng.normal(size=(40, 36, 20)).astype(np.float32), np.eye(4)), str(root / "mri" / f"s{i}.nii.gz"))
    np.save(root / "stack.npy", rng.normal(size=(24, 40, 40)).astype(np.float32))
    tifffile.imwrite(root / "cells.tif", rng.integers(0, 4000, size=(18, 48, 44), dtype=np.uint16))
    (root / "mri" / "cut.nii.gz").write_bytes(gzip.compress((root / "mri" / "s0.nii.gz").read_bytes())[:200])
    return root


def cfg(data, out, **kw):
    return load_config(None, {**TINY3D, "data": str(data), "out": str(out), **kw})


def test_a_3d_run_skips_the_bad_volume_and_exports_strictly(volumes, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"^the mask grid is 1x2x2 \(4 patches of 16x16x16, 2 visible\), far coarser "
                      r"than the paper's 7x7 .* \(--input-depth, --input-size\), or decode from fewer stages "
                      r"\(--feature-modules: .* e\.g\. 8x8x8\)$"):
        summary = pretrain(cfg(volumes, out))
    # 6 files, one unreadable: 3 batches of 2 per epoch, the corrupt file left out of its batch
    assert summary["steps"] == 6 and summary["bad_images"] == 1
    assert np.isfinite(summary["loss_first"]) and np.isfinite(summary["loss_last"])
    assert (out / "bad_images.txt").read_text().startswith(str(volumes / "mri" / "cut.nii.gz"))
    assert len(list((out / "reconstructions").glob("*.png"))) == 3
    fresh = create_backbone("monai:resnet10", in_chans=1)
    report = load_encoder_weights(fresh, out / "encoder.safetensors", strict=True)
    assert not report["missing"] and not report["unexpected"] and not report["shape_mismatch"]
    exported = fresh.state_dict()
    final = torch.load(checkpoint_paths(out)[-1], weights_only=True)["model"]
    assert all(torch.equal(v, final[f"encoder.model.{k}"]) for k, v in exported.items())  # the run's last weights
    torch.manual_seed(0)  # the run's seed: the backbone it started from, rebuilt
    initial = create_backbone("monai:resnet10", in_chans=1, drop_path=0.0).state_dict()
    params = [k for k, _ in fresh.named_parameters()]
    unmoved = [k for k in params if torch.equal(exported[k], initial[k])]
    assert not unmoved, unmoved  # training moved every parameter of the encoder
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "again.safetensors")]) == 0
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["strict_load"] == "ok" and not event["missing"] and event["model"] == "monai:resnet10"


@pytest.mark.slow  # 30 s; exact resume runs through the same code for images, checked by default in
# tests/test_train.py (test_killed_run_resumes_to_identical_weights)
def test_a_3d_run_resumes_to_identical_weights(volumes, tmp_path, capsys):
    """A run stopped after step 2 (its later checkpoints gone, as after a crash) and resumed ends
    with the uninterrupted run's weights, bit for bit."""
    kw = dict(save_every_steps=1, keep_last=10)
    pretrain(cfg(volumes, tmp_path / "straight", **kw))
    shutil.copytree(tmp_path / "straight", tmp_path / "crashed")
    for later in (tmp_path / "crashed").glob("checkpoint-*.pth"):
        if int(later.stem.split("-")[1]) > 2:
            later.unlink()
    capsys.readouterr()
    pretrain(cfg(volumes, tmp_path / "crashed", resume="auto", **kw))
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    resumed = [e for e in events if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["checkpoint"].endswith("checkpoint-00000002.pth"), resumed
    a, b = (torch.load(checkpoint_paths(tmp_path / d)[-1], weights_only=True) for d in ("straight", "crashed"))
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_3d_faults_are_one_line_errors(volumes, tmp_path, capsys):
    base = [f"--{k.replace('_', '-')}={v}" for k, v in TINY3D.items()]
    cases = [
        (["--input-depth=20"], "--input-depth 20 x --input-size 32 is not a multiple of monai:resnet10's total "
                               "stride 16; try --input-depth 32 and --input-size 32"),
        (["--intensity=window:400:-1000"], "intensity must be 'zscore' or 'window:LOW:HIGH'"),
        (["--model=monai:resnet11"], "unknown MONAI model 'resnet11'"),
        (["--norm-stats=data"], "volumes are normalised one by one"),
    ]
    for extra, message in cases:
        code = main(["pretrain", *base, f"--data={volumes}", f"--out={tmp_path / 'x'}", *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count(": error:") == 1 and message in err and "Traceback" not in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain", *base, f"--data={empty}", f"--out={tmp_path / 'y'}"]) == 2
    assert "no volumes (.nii, .nii.gz, .npy, .tif, .tiff) found" in capsys.readouterr().err


def test_the_3d_demo_recipe_is_valid():
    from sparkmim.config import recipe_path

    c = load_config(recipe_path("demo3d"))
    assert c.model == "monai:resnet10" and (c.input_depth, c.input_size) == (32, 48) and c.in_chans == 1
    assert json.dumps(c.to_dict())


@pytest.mark.slow  # 50 s; images and volumes share the distributed code path, which
# tests/test_distributed.py checks on images in the default suite
def test_two_ranks_equal_one_process_on_volumes(tmp_path):
    """DDP (2 ranks, gloo) on volumes equals one process on the same global batch, float64: the
    sparse batch norms of the 3-D encoder, the densify norms and the 3-D decoder's batch norms see
    both ranks."""
    from test_distributed import final_model, torchrun

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(5)
    for i in range(8):
        np.save(data / f"v{i}.npy", rng.normal(size=(20, 36, 36)).astype(np.float32))
    common = {**TINY3D, "data": data, "epochs": 1, "precision": "fp64", "vis_every_epochs": 100, "dist_timeout": 60}
    pretrain(load_config(None, {**common, "batch_size": 4, "out": str(tmp_path / "single")}))
    log = tmp_path / "ddp.log"
    proc = torchrun(2, {**common, "batch_size": 2, "sync_bn": True, "out": tmp_path / "ddp"}, log)
    assert proc.wait(300) == 0, log.read_text()[-3000:]
    single, ddp = final_model(tmp_path / "single"), final_model(tmp_path / "ddp")
    assert single["step"] == ddp["step"] == 2 and ddp["world"] == 2
    for k, v in single["model"].items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-9, atol=1e-11, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(ddp["model"]["encoder.model.bn1.running_var"],
                               single["model"]["encoder.model.bn1.running_var"], rtol=1e-12, atol=1e-12)


def test_evaluation_on_labelled_volumes(tmp_path, capsys):
    """`sparkmim evaluate` on a folder of labelled volumes: features are pooled over the three
    spatial dims of the last map, labels stay with their volumes (k=1 on the training folder
    itself finds every volume's own class), the linear probe trains on them, and fine-tuning
    runs and repeats exactly."""
    rng = np.random.default_rng(7)
    for c, axis in (("depth", 0), ("width", 2)):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(5):
            v = rng.normal(size=(20, 36, 36)).astype(np.float32)
            v += 3 * np.sin(np.arange(v.shape[axis]) / 2).reshape([-1 if a == axis else 1 for a in range(3)])
            np.save(tmp_path / "data" / c / f"{c}{i}.npy", v)
    data = tmp_path / "data"
    common = ["--model=monai:resnet10", "--in-chans=1", "--input-size=32", "--input-depth=16", "--workers=0",
              "--progress=false", "--device=cpu", "--batch-size=4", f"--data={data}", f"--val={data}"]
    assert main(["evaluate", "knn", *common, "--k=1", f"--out={tmp_path / 'knn'}"]) == 0
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert result["train_images"] == result["val_images"] == 10 and result["classes"] == ["depth", "width"]
    assert result["results"][0]["top1"] == 100.0
    assert main(["evaluate", "linear", *common, "--epochs=2", f"--out={tmp_path / 'linear'}"]) == 0
    linear = json.loads((tmp_path / "linear" / "results.json").read_text())["results"][0]
    # the probe separates the two classes it trains on (chance: 50 %)
    assert len(linear["top1_per_epoch"]) == 2 and linear["top1"] == linear["top1_per_epoch"][-1] == 100.0
    # fine-tuning: the whole 3-D network with a pooled linear head, repeatable (MONAI's random
    # crops and flips drawn from torch's seeded generator)
    ft = [*common, "--epochs=2", "--crop-scale-min=0.7", "--mixup=0.2"]
    assert main(["evaluate", "finetune", *ft, f"--out={tmp_path / 'ft1'}"]) == 0
    assert main(["evaluate", "finetune", *ft, f"--out={tmp_path / 'ft2'}"]) == 0
    runs = [json.loads((tmp_path / d / "results.json").read_text())["results"][0] for d in ("ft1", "ft2")]
    assert len(runs[0]["top1_per_epoch"]) == 2 and runs[0]["top1_per_epoch"] == runs[1]["top1_per_epoch"]
    capsys.readouterr()
    assert main(["evaluate", "finetune", *ft, "--cutmix=1", f"--out={tmp_path / 'ft3'}"]) == 2
    assert "cutmix cuts 2-D boxes" in capsys.readouterr().err


def test_reconstruct_volumes_from_a_3d_run(volumes, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(cfg(volumes, out, epochs=1))
    capsys.readouterr()
    grid = tmp_path / "rec.png"
    vols = [volumes / "stack.npy", volumes / "mri" / "s1.nii.gz"]
    assert main(["reconstruct", str(out), *map(str, vols), f"--out={grid}"]) == 0
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["event"] == "reconstruct" and event["images"] == 2
    from PIL import Image

    with Image.open(grid) as im:  # 2 volumes x 3 central slices, rows of input | masked | reconstruction
        w, h = im.size
    tile = 4 * 32 + 4  # the 32-voxel side shown 4x larger, and the gap (tests/test_visualize.py checks the layout)
    assert 6 * tile + 10 < h < 6 * tile + 40  # a title row above
    assert 3 * tile + 50 < w  # a label column (volume name and slice axis) on the left
    assert main(["reconstruct", str(out), str(volumes / "mri" / "cut.nii.gz"), f"--out={grid}"]) == 2
    assert "cannot read volume" in capsys.readouterr().err
