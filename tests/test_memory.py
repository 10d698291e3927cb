"""The memory a training step needs, estimated at start on the meta device: checked against the
memory a real step takes (the operating system's count), and used to refuse what cannot fit and
warn about what takes most of it; crops far larger than the data, and the crop an nnU-Net plans
file trains with."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import write_noise_images
from nets3d import write_plans
from sparkmim.config import load_config
from sparkmim.modality import modality_for
from sparkmim.train.memory import LiveStorage, StepMemory, check_memory, step_memory
from sparkmim.train.setup import build_model, crop_from_plans

TINY = ["--model", "resnet10t", "--input-size", "64", "--decoder-width", "32", "--batch-size", "4", "--workers", "0",
        "--epochs", "1", "--warmup-epochs", "0", "--tensorboard", "false", "--progress", "false"]

# one real step of a SparK ResNet-10t (256 px, batch 8) on the CPU, in a fresh process: the growth of
# the process's resident memory from before the step to its peak (the kernel's high-water mark,
# reset just before the step: getrusage's maxrss would carry the parent's over the exec), beside
# the estimate for that step
_MEASURE = """
import json, torch
from sparkmim.config import load_config
from sparkmim.modality import modality_for
from sparkmim.train.memory import step_memory
from sparkmim.train.setup import build_model
torch.set_num_threads(1)
cfg = load_config(None, dict(model="resnet10t", input_size=256, batch_size=8, decoder_width=64))
model = build_model(cfg, modality_for(cfg.model)).train()
estimate = step_memory(model, (3, 256, 256), 8).step
x = torch.randn(8, 3, 256, 256)
masks = model.draw_masks(x, torch.Generator().manual_seed(0))
def kib(field):  # a line of /proc/self/status, in bytes
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the memory held now
before = kib("VmRSS:")
model(x, masks).loss.backward()
print(json.dumps({"measured": kib("VmHWM:") - before, "estimate": estimate}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the resident memory")
def test_the_estimate_is_what_a_real_step_takes_on_the_cpu():
    """The operating system's count of a real step's memory (about 360 MiB here) is at least 0.9x
    and at most 1.5x the estimate (the CPU kernels' own scratch space is not counted: measured 1.0
    to 1.3x on ResNet, ConvNeXt and MONAI models)."""
    done = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = figures["measured"] / figures["estimate"]
    assert figures["measured"] > 200 * 2**20, figures  # the step dominates what is measured
    assert 0.9 <= ratio <= 1.5, figures


def test_live_storage_counts_what_is_alive_at_once():
    """Three buffers of 1, 2 and 4 KiB made on the meta device, the first freed before the third
    is made: the peak is 6 KiB (2 + 4), and what is left alive 6 KiB; a view adds nothing."""
    with LiveStorage() as live:
        a = torch.empty(256, device="meta")
        b = torch.empty(512, device="meta")
        del a
        c = torch.empty(1024, device="meta")
        view = c[:10]
    assert (live.peak, live.live) == (6 * 1024, 6 * 1024)
    del b, c, view
    assert live.live == 0


def test_the_estimate_leaves_the_model_as_it_was():
    """After the trace every parameter and buffer is the model's own again (shared modules too: an
    nnU-Net network holds its encoder twice), unchanged, and without gradients."""
    pytest.importorskip("dynamic_network_architectures")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        plans = write_plans(Path(tmp) / "plans.json", "anisotropic")
        cfg = load_config(None, dict(model=f"nnunet:{plans}", in_chans=1, input_size=32, input_depth=8,
                                     decoder_width=16))
        model = build_model(cfg, modality_for(cfg.model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    need = step_memory(model, (1, 8, 32, 32), 2)
    assert need.step > 0 and need.optimizer == 2 * 4 * sum(p.numel() for p in model.parameters())
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    x = torch.randn(2, 1, 8, 32, 32)
    model(x, model.draw_masks(x, torch.Generator().manual_seed(0))).loss.backward()  # still runs on the CPU


def test_a_step_that_cannot_fit_is_refused_with_a_batch_that_fits():
    need = StepMemory(weights=2**30, optimizer=2 * 2**30, step=8 * 2**30, batch=8)  # 11 GiB, 1 GiB per sample
    with pytest.raises(ValueError, match=r"needs at least 11.0 GiB .* but 6.0 GiB are free here: lower --batch-size "
                                         r"1 \(with --accum-steps 8 for about the same effective batch\)"):
        check_memory(need, (6 * 2**30, "free here"), torch.device("cpu"), "--input-size 224")
    with pytest.warns(UserWarning, match=r"needs at least 11.0 GiB .* of the 12.0 GiB free here; if the run fails for "
                                         r"memory, lower --batch-size 6"):
        check_memory(need, (12 * 2**30, "free here"), torch.device("cpu"), "--input-size 224")
    check_memory(need, (20 * 2**30, "free here"), torch.device("cpu"), "--input-size 224")  # fits: nothing said


def test_a_crop_that_cannot_fit_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    """``--input-size 32000`` (about 18 TB of activations) ends in one line naming the crop, not in
    the allocator's traceback, and leaves no run folder."""
    from sparkmim.cli import main

    (tmp_path / "imgs").mkdir()
    images = write_noise_images(tmp_path / "imgs", 4, (40, 40), seed=0)
    assert main(["pretrain", *TINY, "--input-size", "32000", "--data", str(images), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count(": error: ") == 1 and "Traceback" not in err
    assert "a training step needs at least" in err and "lower the crop (--input-size 32000)" in err, err
    assert not (tmp_path / "o").exists()


def test_volumes_far_smaller_than_the_crop_are_warned_about(tmp_path, capsys):
    """Three 8x8x8 volumes and a 64^3 crop: a warning gives the data's size, the crop, and how to
    lower it (here the run then stops: three volumes do not fill the batch of 4 asked for)."""
    pytest.importorskip("monai")
    from sparkmim.cli import main

    data = tmp_path / "vols"
    data.mkdir()
    for i in range(3):
        np.save(data / f"v{i}.npy", np.random.default_rng(i).normal(size=(8, 8, 8)).astype(np.float32))
    with pytest.warns(UserWarning, match=r"the volumes are about 8x8x8 \(median of 3 files\), far smaller than the crop "
                                         r"64x64x64, which upsamples them up to 8x .* lower --input-depth and "
                                         r"--input-size .* \(--config demo3d or nnunet_resenc_l\)"):
        assert main(["pretrain", "--model", "monai:resnet10", "--in-chans", "1", "--input-size", "64",
                     "--decoder-width", "32", "--batch-size", "4", "--data", str(data), "--out",
                     str(tmp_path / "o")]) == 2
    assert "3 volumes are fewer than one batch of 4" in capsys.readouterr().err


def test_the_crop_comes_from_the_plans_when_none_is_given(tmp_path):
    """A plans file's patch size, in the order of its ``transpose_forward``, becomes the crop along
    (D, H, W); a crop given by the user, or a preset (no plans), keeps the crop."""
    pytest.importorskip("dynamic_network_architectures")
    import json as js

    plans = write_plans(tmp_path / "plans.json", "anisotropic", patch_size=(24, 8, 24))
    data = js.loads(plans.read_text())
    data["transpose_forward"] = [1, 0, 2]  # the plans' first axis is the volume's height
    plans.write_text(js.dumps(data))
    cfg, taken = crop_from_plans(load_config(None, {"model": f"nnunet:{plans}"}))
    assert (cfg.input_depth, cfg.input_size) == (8, 24) and taken["plans_patch_size"] == [8, 24, 24]
    square = write_plans(tmp_path / "square.json", "anisotropic", patch_size=(16, 40, 24))
    cfg, _ = crop_from_plans(load_config(None, {"model": f"nnunet:{square}"}))
    assert (cfg.input_depth, cfg.input_size) == (16, 32)  # 40 x 24 in-plane: one side of about that area, 8 | side
    given = load_config(None, {"model": f"nnunet:{plans}", "input_size": 64})
    assert crop_from_plans(given) == (given, None)
    preset = load_config(None, {"model": "nnunet:resenc_m"})
    assert crop_from_plans(preset) == (preset, None)
