"""What --data is, and real data at scale: the volume cache (the crops of the raw files, stale
entries rebuilt, a killed build completed, bad files listed), nnU-Net's own preprocessed data
(written here by nnU-Net 2.8.1's code), tar shards read like a folder (with exact resume), a
folder listed without a stat per file, and the data-wait figures of every run."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_noise_images
from sparkmim.config import load_config
from sparkmim.inputs import PathList, data_input

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")
pytest.importorskip("blosc2")

VOLS = dict(model="monai:resnet10", in_chans=1, input_size=32, input_depth=16, decoder_width=32, batch_size=2,
            epochs=1, workers=0, progress=False, tensorboard=False, warmup_epochs=0, lr=1e-3, device="cpu")
TINY = ["--model", "resnet10t", "--input-size", "64", "--decoder-width", "32", "--batch-size", "4", "--workers", "0",
        "--epochs", "1", "--warmup-epochs", "0", "--tensorboard", "false", "--progress", "false",
        "--log-every-steps", "1"]


def write_ct(folder: Path, count: int = 3, seed: int = 0) -> list[Path]:
    """Small CT-like NIfTI volumes (0.8 x 0.8 x 2.5 mm, a body in a zero background)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        a = np.zeros((48, 40, 16), np.float32)
        a[4:44, 3:37, 2:14] = rng.normal(size=(40, 34, 12)) * 100 + 40 * i
        nib.save(nib.Nifti1Image(a, np.diag([0.8, 0.8, 2.5, 1.0])), str(folder / f"ct{i}.nii.gz"))
        paths.append(folder / f"ct{i}.nii.gz")
    return paths


def preprocess(*args) -> dict:
    from sparkmim.cli import main

    assert main(["preprocess", *map(str, args), "--progress", "false"]) == 0
    return json.loads((Path(args[args.index("--out") + 1]) / "sparkmim-cache.json").read_text())


def datasets(raw: str, cache: Path, **kw):
    from sparkmim.modality import VOLUMES

    a, *_ = VOLUMES.pretrain_data(load_config(None, {**VOLS, "data": raw, **kw}))
    b, *_ = VOLUMES.pretrain_data(load_config(None, {**VOLS, "data": str(cache)}))
    return a, b


def test_every_kind_of_data_is_told_apart_once(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\n")
    raw = tmp_path / "Dataset001_X"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "dataset.json").write_text("{}")
    pre = tmp_path / "pre"
    (pre / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (pre / "dataset.json").write_text("{}")
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres"}}}))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sparkmim-cache.json").write_text("{}")
    for i in range(3):
        (tmp_path / f"shards-{i:03d}.tar").write_bytes(b"")
    kinds = {"demo": "demo", str(images): "folder", str(listing): "list", str(raw): "nnunet-raw",
             str(pre): "nnunet-preprocessed", str(cache): "cache", str(tmp_path / "shards-{000..002}.tar"): "shards"}
    for data, kind in kinds.items():
        assert data_input(data).kind == kind, data
    assert len(data_input(str(tmp_path / "shards-{000..002}.tar")).shards) == 3
    with pytest.raises(FileNotFoundError, match=r"shard .*shards-003.tar does not exist \(1 of the 4 shards"):
        data_input(str(tmp_path / "shards-{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_input(str(tmp_path / "nowhere"))


def test_a_long_path_list_is_one_buffer_and_reads_back(tmp_path):
    import pickle

    paths = [tmp_path / f"d{i % 7}" / f"ü{i}.png" for i in range(1000)]
    listed = PathList(paths)
    assert len(listed) == 1000 and list(listed) == paths and listed[-1] == paths[-1] and listed[10:13] == paths[10:13]
    assert list(pickle.loads(pickle.dumps(listed))) == paths  # sent to other ranks as is


# -- the volume cache ------------------------------------------------------------------------------

def test_the_cache_gives_the_crops_the_raw_files_give(tmp_path):
    """Resampled to 1.5 mm and cropped to the foreground once, then read by region: every crop of
    three epochs equals, bit for bit, the crop the raw NIfTI files give with the same key."""
    paths = write_ct(tmp_path / "vols")
    listing = tmp_path / "good.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    manifest = preprocess(tmp_path / "vols", "--out", tmp_path / "cache", "--spacing", "1.5,1.5,1.5",
                          "--foreground-crop")
    assert [v["name"] for v in manifest["volumes"]] == [p.name for p in paths]
    # the non-zero box, 12 x 34 x 40 voxels of 2.5 x 0.8 x 0.8 mm, spans 27.5 x 26.4 x 31.2 mm between its
    # first and last voxel centres: 19, 19 and 22 voxels of 1.5 mm (MONAI's Spacing keeps that extent)
    assert manifest["volumes"][0]["shape"] == [1, 19, 19, 22]
    import blosc2

    stored = blosc2.open(str(tmp_path / "cache" / manifest["volumes"][1]["array"]), mode="r")[:]
    body = stored[stored != 0]
    stats = manifest["volumes"][1]["stats"][0]["nonzero"]
    assert stats["mean"] == pytest.approx(float(body.mean()), rel=1e-5)
    assert stats["std"] == pytest.approx(float(body.std()), rel=1e-5)
    assert stats["p99_5"] == pytest.approx(float(np.sort(body)[int(0.995 * (body.size - 1))]), rel=0.05)
    raw, cached = datasets(str(listing), tmp_path / "cache", spacing="1.5,1.5,1.5", foreground_crop=True)
    for epoch in range(3):
        for i in range(3):
            a, b = raw[(0, epoch, i)][0], cached[(0, epoch, i)][0]
            assert a.shape == (1, 16, 32, 32) and torch.equal(a, b), (epoch, i)


def test_a_stale_entry_is_refused_then_rebuilt_and_a_killed_build_completes(tmp_path, capsys):
    from sparkmim.cli import main

    write_ct(tmp_path / "vols")
    cache = tmp_path / "cache"
    threads = torch.get_num_threads()
    first = preprocess(tmp_path / "vols", "--out", cache)
    assert (first["built"], first["reused"]) == (3, 0)
    assert torch.get_num_threads() == threads  # a build in this process leaves its threads alone
    write_ct(tmp_path / "vols", count=2, seed=9)  # ct0 and ct1 change
    capsys.readouterr()
    args = ["pretrain", *[f"--{k.replace('_', '-')}={v}" for k, v in VOLS.items()], "--data", str(cache), "--out",
            str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 of the 3 volumes of the cache" in err and f"sparkmim preprocess {tmp_path / 'vols'} --out {cache}" in err
    second = preprocess(tmp_path / "vols", "--out", cache)
    assert (second["built"], second["reused"]) == (2, 1)
    raw, cached = datasets(str(tmp_path / "vols"), cache)
    assert torch.equal(raw[(0, 0, 0)][0], cached[(0, 0, 0)][0])  # the new ct0
    # a build killed part-way: one array half written, its entry and the manifest not yet
    entry = next((cache / "volumes").glob("*.json"))
    array = entry.with_suffix(".b2nd")
    array.rename(array.with_name(array.name + ".tmp"))
    entry.unlink()
    (cache / "sparkmim-cache.json").unlink()
    third = preprocess(tmp_path / "vols", "--out", cache)
    assert (third["built"], third["reused"]) == (1, 2) and len(third["volumes"]) == 3
    assert not list((cache / "volumes").glob("*.tmp"))
    assert main(args) == 0  # the completed cache trains


def test_unreadable_volumes_are_listed_by_the_cache_and_by_the_run(tmp_path, capsys):
    from sparkmim.cli import main

    write_ct(tmp_path / "vols", count=2)
    (tmp_path / "vols" / "broken.nii.gz").write_bytes(b"not a volume")
    manifest = preprocess(tmp_path / "vols", "--out", tmp_path / "cache")
    assert [Path(b["path"]).name for b in manifest["bad"]] == ["broken.nii.gz"] and len(manifest["volumes"]) == 2
    args = ["pretrain", *[f"--{k.replace('_', '-')}={v}" for k, v in VOLS.items()], "--data", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "broken.nii.gz" in (tmp_path / "run" / "bad_images.txt").read_text()
    assert main([*args, "--out", str(tmp_path / "run2"), "--spacing", "1,1,1"]) == 2
    assert "the cache" in capsys.readouterr().err


# -- nnU-Net's preprocessed data ---------------------------------------------------------------------

_NNUNET_PREPROCESS = """
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
extract_fingerprints([1], num_processes=1, check_dataset_integrity=False)
plan_experiments([1])
preprocess([1], configurations=("3d_fullres",), num_processes=(1,))
"""


@pytest.fixture(scope="module")
def nnunet_preprocessed(tmp_path_factory):
    """A raw dataset (one CT channel, thick slices along the first voxel axis, so that nnU-Net
    transposes the axes) planned and preprocessed by nnU-Net 2.8.1's own code, in a subprocess."""
    pytest.importorskip("nnunetv2.experiment_planning.plan_and_preprocess_api")
    root = tmp_path_factory.mktemp("nnunet")
    raw = root / "raw" / "Dataset001_Test"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                                                  "numTraining": 4, "file_ending": ".nii.gz"}))
    rng = np.random.default_rng(0)
    for c in range(4):
        a = (rng.normal(size=(12, 40, 48)) * 100).astype(np.float32)
        label = np.zeros(a.shape, np.uint8)
        label[3:9, 8:30, 10:40] = 1
        a[label > 0] += 300
        affine = np.diag([3.0, 0.8, 0.8, 1.0])  # thick along i
        nib.save(nib.Nifti1Image(a, affine), str(raw / "imagesTr" / f"case{c:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(raw / "labelsTr" / f"case{c:03d}.nii.gz"))
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "results")}
    done = subprocess.run([sys.executable, "-c", _NNUNET_PREPROCESS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "pre" / "Dataset001_Test"


def test_nnunets_preprocessed_cases_are_read_by_region_in_their_own_axes(nnunet_preprocessed, tmp_path, capsys,
                                                                          monkeypatch):
    """The arrays nnU-Net wrote (``.b2nd``, axes in its transpose_forward order): each crop read by
    region equals the crop of the whole array put back in the volume's axes, without any
    normalisation on top of nnU-Net's; the .pkl files are never opened; a run trains on them with
    the plans' network and crop."""
    import blosc2

    from sparkmim.arrays import nnunet_preprocessed_volumes
    from sparkmim.cli import main
    from sparkmim.modality import VOLUMES
    from sparkmim.volumes import volume_transform

    plans = json.loads((nnunet_preprocessed / "nnUNetPlans.json").read_text())
    order = plans["transpose_forward"]
    assert order != [0, 1, 2]  # the thick axis moved first: the reading must undo it
    import builtins

    real_open = builtins.open

    def no_pickles(file, *args, **kwargs):  # nnU-Net's .pkl files are pickles: never opened
        assert not str(file).endswith(".pkl"), file
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_pickles)
    volumes, channels, read = nnunet_preprocessed_volumes(nnunet_preprocessed, "monai:resnet10")
    assert channels == ["CT"] and [v.name for v in volumes] == [f"case{c:03d}" for c in range(4)]
    dataset, *_ = VOLUMES.pretrain_data(load_config(None, {**VOLS, "data": str(nnunet_preprocessed)}))
    whole = volume_transform((16, 32, 32), None)
    for i, volume in enumerate(volumes):
        stored = blosc2.open(str(volume.path), mode="r")[:]
        original = np.transpose(stored, (0, *[1 + order.index(a) for a in range(3)]))  # by hand: back to D, H, W
        assert original.shape[1:] == tuple(np.array(stored.shape[1:])[np.argsort(order)])
        whole.set_random_state(seed=dataset_seed(i))
        assert torch.equal(dataset[(0, 0, i)][0], whole(original)), i
    assert list((nnunet_preprocessed / "nnUNetPlans_3d_fullres").glob("*.pkl"))  # they are there, and were not read
    plans_file = nnunet_preprocessed / "nnUNetPlans.json"
    capsys.readouterr()
    assert main(["pretrain", "--model", f"nnunet:{plans_file}", "--data", str(nnunet_preprocessed), "--batch-size", "4",
                 "--epochs", "1", "--workers", "0", "--progress", "false", "--tensorboard", "false",
                 "--out", str(tmp_path / "run")]) == 0
    start = json.loads(next(line for line in capsys.readouterr().out.splitlines() if '"event": "start"' in line))
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    assert start["data"]["kind"] == "nnunet-preprocessed" and start["in_chans_from_data"] == 1  # dataset.json's, not 3
    assert start["crop_from_plans"]["plans_patch_size"] == [patch[order.index(a)] for a in range(3)]
    deepest = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][-1]
    assert start["decoder_width_from_encoder"] == deepest
    import yaml

    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["decoder_width"] == deepest


def dataset_seed(index: int, seed: int = 0, epoch: int = 0) -> int:
    from sparkmim.masking import seed_for

    return seed_for(seed, epoch, index) % 2**32


# -- tar shards ------------------------------------------------------------------------------------

def write_shards(folder: Path, images: Path, per_shard: int = 4) -> str:
    """The images of a folder in tar shards of ``per_shard`` samples, WebDataset style (each
    sample a KEY.png and a KEY.cls member)."""
    files = sorted(images.iterdir())
    for s in range(0, len(files), per_shard):
        with tarfile.open(folder / f"shards-{s // per_shard:03d}.tar", "w") as tar:
            for f in files[s:s + per_shard]:
                tar.add(f, arcname=f.name)
                label = folder / f"{f.stem}.cls"
                label.write_text("0")
                tar.add(label, arcname=label.name)
    return str(folder / f"shards-{{000..{(len(files) - 1) // per_shard:03d}}}.tar")


def test_shards_are_read_like_a_folder_and_resume_exactly(tmp_path, capsys):
    """Each sample of the shards equals the folder's sample with the same key; a corrupt member is
    skipped and listed by its shard and name; a run on shards stopped after an epoch and resumed
    ends with the uninterrupted run's weights."""
    from sparkmim.cli import main
    from sparkmim.modality import IMAGES

    (tmp_path / "imgs").mkdir()
    images = write_noise_images(tmp_path / "imgs", 8, (70, 90), seed=1)
    spec = write_shards(tmp_path, images)
    base = {"model": "resnet10t", "input_size": 64, "batch_size": 4}
    folder, *_ = IMAGES.pretrain_data(load_config(None, {**base, "data": str(images)}))
    shards, *_ = IMAGES.pretrain_data(load_config(None, {**base, "data": spec}))
    assert len(shards) == len(folder) == 8
    for i in range(8):
        assert torch.equal(folder[(0, 1, i)][0], shards[(0, 1, i)][0]), i
    import shutil

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(["pretrain", *TINY, "--data", spec, "--out", str(straight), "--epochs", "2", "--save-every-steps", "1",
                 "--keep-last", "10"]) == 0
    shutil.copytree(straight, crashed)  # a run killed after step 1: its later checkpoints never written
    for later in sorted(crashed.glob("checkpoint-*.pth"))[1:]:
        later.unlink()
    assert main(["pretrain", "--out", str(crashed), "--resume", "auto"]) == 0
    a, b = (torch.load(sorted(d.glob("checkpoint-*.pth"))[-1], weights_only=True) for d in (straight, crashed))
    assert a["step"] == b["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # a header this reader leaves to tarfile (a name longer than ustar holds: a pax header)
    from sparkmim.shards import index_shards

    long = "a" * 120 + ".png"
    with tarfile.open(tmp_path / "long.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(sorted(images.iterdir())[0], arcname=long)
        tar.add(sorted(images.iterdir())[1], arcname="short.png")
    index = index_shards([tmp_path / "long.tar"])
    assert [Path(str(n)).name for n in index.names] == [long, "short.png"]
    first = sorted(images.iterdir())[0].read_bytes()
    with open(tmp_path / "long.tar", "rb") as f:
        f.seek(int(index.offset[0]))
        assert f.read(int(index.size[0])) == first
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zz.png").write_bytes(b"not a png")
    with tarfile.open(tmp_path / "extra-000.tar", "w") as tar:
        for f in [*sorted(images.iterdir())[:3], broken / "zz.png"]:
            tar.add(f, arcname=f.name)
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*extra-000.tar/zz.png"):
        assert main(["pretrain", *TINY, "--data", str(tmp_path / "extra-000.tar"), "--out", str(tmp_path / "x")]) == 0


# -- data wait, throughput, estimate, benchmark ---------------------------------------------------------

def test_every_log_line_says_how_long_the_run_waited_for_data(tmp_path, monkeypatch):
    """metrics.jsonl gives data_wait (a share of the time) and eta_s. A loader that sleeps 1.5 s
    per image makes each step of 2 images wait at least 3 s: data_wait is at least that share
    of the step's time (read back from img_per_s, so however busy the machine is), and the run
    says once that it waits, naming --workers (the wait stays above a fifth of the step while the
    tiny model's step takes under 12 s, as on a 2-core machine busy with other work)."""
    import time

    from sparkmim.cli import main
    from sparkmim.data import ImageFiles

    (tmp_path / "imgs").mkdir()
    images = write_noise_images(tmp_path / "imgs", 4, (70, 90), seed=1)
    real = ImageFiles._read

    def slow(self, index):
        time.sleep(1.5)
        return real(self, index)

    monkeypatch.setattr(ImageFiles, "_read", slow)
    with pytest.warns(UserWarning, match=r"of the step time went to waiting for data: raise --workers \(now 0\)"):
        assert main(["pretrain", *TINY, "--batch-size", "2", "--data", str(images), "--out", str(tmp_path / "run")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        step_seconds = 2 / r["img_per_s"]
        assert 3.0 / step_seconds * 0.95 <= r["data_wait"] <= 1.0, (r, step_seconds)
    assert lines[0]["eta_s"] > 0 and lines[-1]["eta_s"] == 0


def test_benchmark_measures_steps_on_the_users_data_and_writes_nothing(tmp_path, capsys):
    from sparkmim.cli import main

    (tmp_path / "imgs").mkdir()
    images = write_noise_images(tmp_path / "imgs", 8, (70, 90), seed=1)
    capsys.readouterr()
    assert main(["pretrain", *TINY, "--data", str(images), "--out", str(tmp_path / "run"), "--epochs", "100",
                 "--benchmark", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["event"] == "benchmark" and (result["steps"], result["timed_steps"], result["run_steps"]) == (3, 2, 200)
    assert result["img_per_s"] > 0 and 0 <= result["data_wait"] <= 1
    assert result["estimated_run_h"] == pytest.approx(result["step_s"] * 200 / 3600, rel=0.05, abs=0.01)
    assert not (tmp_path / "run").exists()


def test_a_3d_run_takes_a_3d_decoder_width_unless_one_is_set(tmp_path):
    """Volumes: the decoder's width is the encoder's deepest (512 for MONAI's ResNet-10, 2**4 | 512);
    one set by a flag or by a recipe is kept; images keep the paper's 768. (A run writes the width
    it took into config.yaml: the nnU-Net test above reads it back.)"""
    import yaml

    from sparkmim.modality import IMAGES, VOLUMES
    from sparkmim.train.setup import build_model, width_from_encoder

    cfg = load_config(None, {"model": "monai:resnet10", "in_chans": 1, "input_size": 32})
    assert width_from_encoder(cfg, VOLUMES) and build_model(cfg, VOLUMES, True).decoder_width == 512
    assert not width_from_encoder(load_config(None, {"model": "monai:resnet10", "decoder_width": 64}), VOLUMES)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "monai:resnet10", "decoder_width": 96}))
    assert not width_from_encoder(load_config(recipe), VOLUMES)
    assert not width_from_encoder(load_config(None, {"model": "resnet18"}), IMAGES)


def test_nnunets_older_layouts_read_the_same(nnunet_preprocessed, tmp_path):
    """The same cases as nnU-Net before 2.5 kept them, packed (``CASE.npz``, written by nnU-Net's
    own nnUNetDatasetNumpy.save_case) or unpacked (``CASE.npy``): the same crops as the .b2nd."""
    import shutil

    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    from sparkmim.modality import VOLUMES

    newest, *_ = VOLUMES.pretrain_data(load_config(None, {**VOLS, "data": str(nnunet_preprocessed)}))
    for layout in ("npz", "npy"):
        copy = tmp_path / layout
        copy.mkdir()
        for name in ("dataset.json", "nnUNetPlans.json"):
            shutil.copy(nnunet_preprocessed / name, copy / name)
        (copy / "nnUNetPlans_3d_fullres").mkdir()
        for case in sorted((nnunet_preprocessed / "nnUNetPlans_3d_fullres").glob("case???.b2nd")):
            data = blosc2.open(str(case), mode="r")[:]
            target = copy / "nnUNetPlans_3d_fullres" / case.stem
            if layout == "npz":
                nnUNetDatasetNumpy.save_case(data, np.zeros_like(data, dtype=np.int16), {}, str(target))
                (target.parent / f"{case.stem}.pkl").unlink()
            else:
                np.save(f"{target}.npy", data)
        older, *_ = VOLUMES.pretrain_data(load_config(None, {**VOLS, "data": str(copy)}))
        assert len(older) == len(newest) == 4
        for i in range(4):
            assert torch.equal(older[(0, 2, i)][0], newest[(0, 2, i)][0]), (layout, i)
