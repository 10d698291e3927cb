"""Pre-training engine: a tiny real run, exact resume after a kill, non-finite loss, schedules."""

import os
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

from sparkmim.checkpoint import CheckpointManager, load_encoder_weights
from sparkmim.config import load_config
from sparkmim.engine import NonFiniteLossError, Schedule, param_groups, pretrain

TINY = dict(model="resnet10t", input_size=64, decoder_width=32, batch_size=4, workers=0, epochs=2,
            warmup_epochs=0.5, lr=1e-3, log_every_steps=1, vis_every_epochs=1, tensorboard=False, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        sub = root / f"class{i % 2}"
        sub.mkdir(exist_ok=True)
        yy, xx = np.mgrid[0:72, 0:80]
        img = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i * 10) % 256, rng.integers(0, 256, (72, 80))], -1)
        Image.fromarray(img.astype(np.uint8)).save(sub / f"img{i}.png")
    return root


def cfg(folder, out, **kw):
    return load_config(None, {**TINY, "data": str(folder), "out": str(out), **kw})


def test_tiny_run_writes_everything_and_exports_strictly(folder, tmp_path):
    out = tmp_path / "run"
    summary = pretrain(cfg(folder, out))
    assert summary["steps"] == 8 and summary["images_seen"] == 32 and summary["bad_images"] == 0
    assert np.isfinite(summary["loss_first"]) and np.isfinite(summary["loss_last"])
    names = sorted(p.name for p in out.iterdir())
    assert {"config.yaml", "metrics.jsonl", "encoder.safetensors", "reconstructions"} <= set(names)
    assert len(list((out / "reconstructions").glob("*.png"))) == 3  # start, epoch 1, epoch 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8
    ckpt = CheckpointManager(out).latest()
    state = torch.load(ckpt, weights_only=True)  # plain data
    assert state["step"] == 8 and state["config"]["model"] == "resnet10t"
    fresh = timm.create_model("resnet10t", num_classes=0)
    report = load_encoder_weights(fresh, out / "encoder.safetensors", strict=True)
    assert not report["missing"] and not report["unexpected"]


def _final_state(out: Path) -> dict:
    return torch.load(CheckpointManager(out).latest(), weights_only=True)


def _assert_same_training_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)


def test_killed_run_resumes_to_identical_weights(folder, tmp_path):
    kw = dict(epochs=3, save_every_steps=1, keep_last=2)
    pretrain(cfg(folder, tmp_path / "straight", **kw))
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
    killed_at = CheckpointManager(out).latest()
    assert killed_at is not None and int(killed_at.stem.split("-")[1]) < 12
    summary = pretrain(cfg(folder, out, resume="auto", **kw))
    assert summary["steps"] == 12
    _assert_same_training_state(reference, _final_state(out))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    from sparkmim.model import SparK

    real = SparK.forward_loss
    calls = {"n": 0}

    def poisoned(self, images, prediction, visible):
        calls["n"] += self.training  # count training steps only (not reconstructions)
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
            pytest.raises(RuntimeError, match="were unreadable"):
        pretrain(cfg(tmp_path, tmp_path / "out"))


def test_schedule_matches_the_paper_recipe():
    s = Schedule(peak_lr=1.0, total_steps=1600, warmup_steps=40)
    assert s.lr(0) == pytest.approx(0.005) and s.lr(40) == pytest.approx(1.0)
    assert s.lr(20) == pytest.approx(0.005 + 0.995 * 0.5)
    assert s.lr(1600) == pytest.approx(0.001)
    assert s.lr(820) == pytest.approx(0.001 + 0.999 * 0.5)
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(1600) == pytest.approx(0.2)
    assert s.weight_decay(800) == pytest.approx(0.12)


def test_no_weight_decay_on_biases_norms_and_mask_tokens():
    from sparkmim import SparK, SparseEncoder

    model = SparK(SparseEncoder.from_timm("resnet10t"), decoder_width=32)
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("mask_token") for n in nd) and any(n.endswith(".bias") for n in nd)
    assert "encoder.model.bn1.weight" in nd and no_decay["weight_decay"] == 0.0
