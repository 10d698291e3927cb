"""Pre-training engine: a tiny real run, exact resume after a kill, non-finite loss, schedules."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from sparkmim.checkpoint import CheckpointManager, checkpoint_paths, weights_state
from sparkmim.config import load_config
from sparkmim.data import DataError
from sparkmim.distributed import DistInfo
from sparkmim.train import NonFiniteLossError, pretrain
from sparkmim.train.run import Run
from sparkmim.weights import encoder_weights, load_encoder_weights

TINY = dict(model="resnet10t", input_size=64, decoder_width=32, batch_size=4, workers=0, epochs=2,
            warmup_epochs=0.5, lr=1e-3, log_every_steps=1, vis_every_epochs=1, tensorboard=False, progress=False)


def draw_images(n: int, place) -> None:
    """``n`` 72 x 80 test images (stripes plus seeded noise), image ``i`` saved at ``place(i)``."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:72, 0:80]
    for i in range(n):
        img = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i * 10) % 256, rng.integers(0, 256, (72, 80))], -1)
        path = place(i)
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    draw_images(16, lambda i: root / f"class{i % 2}" / f"img{i}.png")
    return root


def cfg(folder, out, **kw):
    return load_config(None, {**TINY, "data": str(folder), "out": str(out), **kw})


def test_tiny_run_writes_everything_and_exports_strictly(folder, tmp_path):
    out = tmp_path / "run"
    summary = pretrain(cfg(folder, out))
    assert summary["steps"] == 8 and summary["images_seen"] == 32 and summary["bad_images"] == 0
    assert np.isfinite(summary["loss_first"]) and np.isfinite(summary["loss_last"])
    names = sorted(p.name for p in out.iterdir())
    assert {"config.yaml", "metrics.jsonl", "metrics.png", "encoder.safetensors", "reconstructions"} <= set(names)
    assert len(list((out / "reconstructions").glob("*.png"))) == 3  # start, epoch 1, epoch 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8
    with Image.open(out / "metrics.png") as plot:  # loss, gradient norm and lr, redrawn at the end
        assert plot.size == (1200, 340)
    ckpt = checkpoint_paths(out)[-1]
    state = torch.load(ckpt, weights_only=True)  # plain data
    assert state["step"] == 8 and state["config"]["model"] == "resnet10t"
    fresh = timm.create_model("resnet10t", num_classes=0)
    report = load_encoder_weights(fresh, out / "encoder.safetensors", strict=True)
    assert not report["missing"] and not report["unexpected"]
    # the timm model folder loads in one call and computes the trained encoder's features
    trained = timm.create_model("resnet10t", num_classes=0)
    trained.load_state_dict(encoder_weights(state["model"]), strict=True)
    loaded = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.eval()(x), trained.eval()(x))
    assert list(loaded.pretrained_cfg["mean"]) == state["norm_mean"] and loaded.pretrained_cfg["tag"] == "sparkmim"
    head = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True, num_classes=5)  # for fine-tuning
    assert head.get_classifier().out_features == 5
    assert torch.equal(head.eval().forward_features(x), trained.forward_features(x))


def test_one_python_call_runs_like_the_command(folder, tmp_path):
    import sparkmim

    summary = sparkmim.pretrain(data=str(folder), out=str(tmp_path / "api"), **{**TINY, "epochs": 1})
    assert summary["steps"] == 4 and summary["run_dir"] == str(tmp_path / "api")
    assert (tmp_path / "api" / "encoder.safetensors").is_file()
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        sparkmim.pretrain(data=str(folder), epochs=0)


@pytest.mark.slow  # a whole run; an older run folder resumes in test_a_run_folder_written_before_the_renovation_...
def test_a_checkpoint_written_before_bad_files_and_loss_last_were_saved_resumes(folder, tmp_path):
    """The checkpoint format gained ``bad_files`` and ``loss_last``; a checkpoint without them (as
    written by earlier releases) resumes, and the resumed run ends like an uninterrupted one."""
    straight = tmp_path / "straight"
    pretrain(cfg(folder, straight))
    first_epoch = CheckpointManager(straight).paths()[0]
    state = torch.load(first_epoch, weights_only=True)
    assert state["step"] == 4
    for key in ("bad_files", "loss_last"):
        del state[key]
    out = tmp_path / "old"
    out.mkdir()
    torch.save(state, out / first_epoch.name)
    summary = pretrain(cfg(folder, out, resume="auto"))
    assert summary["steps"] == 8
    _assert_same_training_state(_final_state(straight), _final_state(out))


OLD_RUN = Path(__file__).parent / "data" / "run_3288624"


def test_a_run_folder_written_before_the_renovation_resumes_and_exports(tmp_path):
    """``tests/data/run_3288624`` was written by main at commit 3288624 (before the train/ and
    weights.py split): ``sparkmim pretrain --model test_convnext --input-size 64 --decoder-width 32
    --batch-size 4 --epochs 2 --save-every-epochs 1 --log-every-steps 1`` on the 8 images drawn
    below; its config, first two metric lines and step-2 checkpoint are kept. Today's code restores
    every tensor of it, continues it to the end, and exports its encoder with the original keys."""
    images = tmp_path / "images"
    draw_images(8, lambda i: images / f"img{i}.png")
    out = tmp_path / "old"
    shutil.copytree(OLD_RUN, out)
    saved = torch.load(out / "checkpoint-00000002.pth", weights_only=True)
    c = load_config(None, dict(data=str(images), out=str(out), model="test_convnext", input_size=64, decoder_width=32,
                               batch_size=4, workers=0, epochs=2, save_every_epochs=1, log_every_steps=1,
                               tensorboard=False, progress=False, resume="auto"))
    run = Run(c, DistInfo(), torch.device("cpu"))
    assert not run.finished and run.state.step == 2 and run.state.first_loss == saved["first_loss"]
    model = run.model.state_dict()
    assert model.keys() == saved["model"].keys()
    for k, v in saved["model"].items():
        assert torch.equal(model[k], v), k
    opt = run.optimizer.state_dict()["state"]
    assert opt.keys() == saved["optimizer"]["state"].keys()
    for pid, st in saved["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(opt[pid][k]), torch.as_tensor(v)), (pid, k)
    summary = run.train()
    assert summary["steps"] == 4 and summary["loss_first"] == saved["first_loss"]
    old_lines = (OLD_RUN / "metrics.jsonl").read_text().splitlines()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == old_lines and [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    for source in (OLD_RUN / "checkpoint-00000002.pth", out):  # the old checkpoint and the finished run
        fresh = timm.create_model("test_convnext", num_classes=0)
        fresh.load_state_dict(weights_state(source), strict=True)
    assert torch.equal(weights_state(OLD_RUN / "checkpoint-00000002.pth")["stem.0.weight"],
                       saved["model"]["encoder.model.stem.0.weight"])


@pytest.mark.slow  # two whole runs of 10-25 s; the default suite stays under ten minutes on two cores
def test_loss_first_is_the_first_steps_loss_whatever_the_logging_interval(folder, tmp_path):
    """loss_first is the first optimiser step's loss even when no log line falls on that step; every
    log line carries the global gradient norm before clipping."""
    every = pretrain(cfg(folder, tmp_path / "every", epochs=1))
    lines = [json.loads(line) for line in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and every["loss_first"] == lines[0]["loss"]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in lines)
    assert len({r["grad_norm"] for r in lines}) == len(lines)  # one value per step, not a constant
    rare = pretrain(cfg(folder, tmp_path / "rare", epochs=1, log_every_steps=100))
    (last,) = [json.loads(line) for line in (tmp_path / "rare" / "metrics.jsonl").read_text().splitlines()]
    assert last["step"] == 4 and last["loss"] != lines[0]["loss"]  # the window mean of 4 steps
    assert rare["loss_first"] == lines[0]["loss"]
    assert last["grad_norm"] == pytest.approx(sum(r["grad_norm"] for r in lines) / 4, rel=1e-9)


def _final_state(out: Path) -> dict:
    return torch.load(checkpoint_paths(out)[-1], weights_only=True)


def _assert_same_training_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)


def _metric_lines(out: Path) -> list[dict]:
    """The metric lines of a run without what this process measured (its speed, its wait for data,
    the estimate drawn from them)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("img_per_s", "data_wait", "eta_s")} for line in lines]


@pytest.mark.slow  # a whole run of 10-25 s; the default suite stays under ten minutes on two cores
def test_a_resume_mid_window_logs_what_the_uninterrupted_run_logs(folder, tmp_path):
    """The loss and gradient-norm sums of the metric line in progress are kept in the checkpoint:
    resumed at step 4 of the window 4-6, the run logs lines 6 and 8 (and loss_last) exactly as
    the uninterrupted run does."""
    kw = dict(save_every_steps=1, keep_last=8, log_every_steps=3)
    straight = pretrain(cfg(folder, tmp_path / "straight", **kw))
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("checkpoint-00000004.pth", "config.yaml"):
        shutil.copy(tmp_path / "straight" / name, out)
    (out / "metrics.jsonl").write_text((tmp_path / "straight" / "metrics.jsonl").read_text())  # lines 3, 6 and 8
    resumed = pretrain(cfg(folder, out, resume="auto", **kw))
    assert [line["step"] for line in _metric_lines(out)] == [3, 6, 8]
    assert _metric_lines(out) == _metric_lines(tmp_path / "straight")
    assert resumed["loss_last"] == straight["loss_last"]


def test_a_finished_run_leaves_no_worker_thread_or_run_behind(folder, tmp_path):
    """pretrain() tears down in order before it returns: the loader's worker processes are joined
    and nothing of the run stays alive waiting for the garbage collector (with several ranks it
    would hold the process group past its destruction, and the process could abort at exit)."""
    import gc
    import multiprocessing
    import threading
    import weakref

    from sparkmim.train import run as run_module

    made = []

    class Watched(run_module.Run):
        def __init__(self, *args, **kwargs):
            made.append(weakref.ref(self))
            super().__init__(*args, **kwargs)

    threads = set(threading.enumerate())
    original, run_module.Run = run_module.Run, Watched
    gc.disable()
    try:
        pretrain(cfg(folder, tmp_path / "run", epochs=1, workers=2, tensorboard=True))
        assert multiprocessing.active_children() == []
        assert set(threading.enumerate()) <= threads
        assert len(made) == 1 and made[0]() is None
    finally:
        gc.enable()
        run_module.Run = original


def test_killed_run_resumes_to_identical_weights(folder, tmp_path):
    kw = dict(epochs=3, save_every_steps=1, keep_last=2, log_every_steps=5)
    straight = pretrain(cfg(folder, tmp_path / "straight", **kw))
    reference = _final_state(tmp_path / "straight")

    out = tmp_path / "killed"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, **kw, "data": folder, "out": out}.items()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sparkmim", "pretrain", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not (out / "checkpoint-00000005.pth").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-epoch 2 (4 steps per epoch), no clean-up
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint_paths(out)[-1]
    assert killed_at is not None and int(killed_at.stem.split("-")[1]) < 12
    summary = pretrain(cfg(folder, out, resume="auto", **kw))
    assert summary["steps"] == 12
    assert summary["loss_first"] == straight["loss_first"]  # kept across the resume
    _assert_same_training_state(reference, _final_state(out))
    assert _metric_lines(out) == _metric_lines(tmp_path / "straight")  # lines 5, 10 and 12
    assert summary["loss_last"] == straight["loss_last"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    from sparkmim.model import SparK

    real = SparK.forward_loss
    calls = {"n": 0}

    def poisoned(self, images, prediction, visible):
        # count training steps only (not reconstructions, nor the start's memory estimate on the meta device)
        calls["n"] += self.training and images.device.type != "meta"
        loss = real(self, images, prediction, visible)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(SparK, "forward_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="NaN or infinite"):
        pretrain(cfg(folder, out, save_every_steps=1))
    ckpts = CheckpointManager(out).paths()
    assert [p.name for p in ckpts] == ["checkpoint-00000001.pth", "checkpoint-00000002.pth"]
    state = torch.load(ckpts[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_with_an_incompatible_configuration_is_refused(folder, tmp_path):
    out = tmp_path / "run"
    pretrain(cfg(folder, out, epochs=1))
    with pytest.raises(ValueError, match="decoder_width: checkpoint 32 vs now 64"):
        pretrain(cfg(folder, out, epochs=2, decoder_width=64, resume="auto"))


def test_mostly_unreadable_data_stops_with_a_clear_message(tmp_path):
    for i in range(14):
        (tmp_path / f"broken{i:02d}.jpg").write_bytes(b"garbage")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok0.png")
    Image.new("RGB", (64, 64), (4, 5, 6)).save(tmp_path / "ok1.png")
    with pytest.warns(UserWarning, match="skipping unreadable image"), \
            pytest.raises(DataError, match="14 of the 16 image files read so far are unreadable"):
        pretrain(cfg(tmp_path, tmp_path / "out"))
    listed = [line.split("\t")[0] for line in (tmp_path / "out" / "bad_images.txt").read_text().splitlines()]
    assert sorted(Path(p).name for p in listed) == [f"broken{i:02d}.jpg" for i in range(14)]  # each file once


def test_captured_step_gives_the_eager_steps_weights():
    """The step as :class:`CapturedStep` records it (static image and mask buffers, masks rebuilt
    inside the step, the optimiser's device-held step count, lr and weight decay written in place)
    gives, replayed, bit-identical weights, optimiser state and statistics to eager
    :func:`train_step`, over warm-up, recording and replays with two micro-batches per step. (On
    the CPU the replay runs the static function eagerly; on CUDA it is one graph launch.)"""
    from sparkmim import SparK, SparseEncoder
    from sparkmim.optim import Schedule
    from sparkmim.train import apply_schedule, build_optimizer, train_step
    from sparkmim.train.capture import CapturedStep

    config = load_config(None, {"model": "resnet10t"})
    sched = Schedule(1e-2, 8, 2)
    runs = []
    for captured in (False, True):
        torch.manual_seed(0)
        model = SparK(SparseEncoder.from_timm("resnet10t"), decoder_width=32).double()
        opt = build_optimizer(model, config, 1e-2)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        step = CapturedStep(model, opt, scaler, accum_steps=2, warmup_steps=2) if captured else None
        stats = []
        for i in range(6):
            apply_schedule(opt, sched, i)
            g = torch.Generator().manual_seed(100 + i)
            batches = [(x, model.draw_masks(x, g)) for x in torch.randn(2, 2, 3, 64, 64, generator=g, dtype=torch.float64)]
            out = step(batches) if captured else train_step(model, opt, scaler, batches, accum_steps=2)
            stats.append((out.loss_sum, out.grad_norm))
        runs.append((model, opt, stats, step))
    (eager, eager_opt, eager_stats, _), (cap, cap_opt, cap_stats, step) = runs
    assert step.outputs is not None and len(step.images) == 2  # recorded at the third call, replayed after
    assert eager_stats == cap_stats and len({float(s[0]) for s in cap_stats}) == 6
    for (name, a), b in zip(eager.named_parameters(), cap.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(eager.buffers(), cap.buffers()):
        assert torch.equal(a, b)
    for p_a, p_b in zip(eager.parameters(), cap.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(eager_opt.state[p_a][k], cap_opt.state[p_b][k])
    assert float(cap_opt.param_groups[0]["step"]) == 6


def test_capture_is_refused_where_it_cannot_run(folder, tmp_path):
    with pytest.raises(Exception, match="--capture needs a CUDA device"):
        pretrain(cfg(folder, tmp_path / "cap", capture=True, epochs=1))
