"""DDP over gloo on CPU with torchrun: equivalence with one process; resume across world sizes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_noise_images
from sparkmim.checkpoint import checkpoint_paths
from sparkmim.config import load_config
from sparkmim.train import pretrain

BASE = dict(model="resnet10t", input_size=64, decoder_width=32, workers=0, warmup_epochs=0.5, lr=2e-3,
            log_every_steps=1, vis_every_epochs=100, tensorboard=False, progress=False, dist_timeout=60)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_noise_images(tmp_path_factory.mktemp("ddp_images"), 16, (70, 70), seed=3)


def torchrun(nproc: int, options: dict, log: Path, extra=()) -> subprocess.Popen:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           "-m", "sparkmim", "pretrain", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def final_model(out: Path) -> dict:
    return torch.load(checkpoint_paths(out)[-1], weights_only=True)


def test_two_ranks_equal_one_process_on_the_same_global_batch(folder, tmp_path):
    common = {**BASE, "data": folder, "epochs": 1, "precision": "fp64"}  # float64: tight comparison
    pretrain(load_config(None, {**common, "batch_size": 4, "out": str(tmp_path / "single")}))
    log = tmp_path / "ddp.log"
    proc = torchrun(2, {**common, "batch_size": 2, "sync_bn": True, "out": tmp_path / "ddp"}, log)
    assert proc.wait(300) == 0, log.read_text()[-3000:]
    single, ddp = final_model(tmp_path / "single"), final_model(tmp_path / "ddp")
    assert single["step"] == ddp["step"] == 4 and ddp["world"] == 2
    for k, v in single["model"].items():
        if not v.is_floating_point():
            assert torch.equal(v, ddp["model"][k]), k
            continue
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-9, atol=1e-11, msg=lambda m, k=k: f"{k}: {m}")
    # the runs trained: every parameter that takes part moved from where both started (rebuilt from the seed)
    from sparkmim.modality import modality_for
    from sparkmim.train.setup import build_model

    torch.manual_seed(0)
    cfg = load_config(None, {**common, "batch_size": 4})
    start = build_model(cfg, modality_for(cfg.model))
    trained = [k for k, _ in start.named_parameters() if k not in (start.unused_parameters() or [])]
    initial = start.state_dict()
    unmoved = [k for k in trained if torch.equal(single["model"][k], initial[k].double())]
    assert trained and not unmoved, unmoved
    # the sparse SyncBatchNorm saw both ranks: running statistics equal the single process's
    torch.testing.assert_close(ddp["model"]["encoder.model.bn1.running_var"],
                               single["model"]["encoder.model.bn1.running_var"], rtol=1e-12, atol=1e-12)
    assert '"world": 2' in log.read_text() and '"sync_bn": true' in log.read_text()


@pytest.fixture(scope="module")
def two_rank_run(folder, tmp_path_factory):
    """An uninterrupted 3-epoch run on 2 ranks (sparse SyncBatchNorm on), all checkpoints kept."""
    out = tmp_path_factory.mktemp("two_ranks")
    proc = torchrun(2, {**FAULT_RUN, "data": folder, "out": out / "run"}, out / "run.log")
    assert proc.wait(300) == 0, (out / "run.log").read_text()[-3000:]
    return out / "run"


FAULT_RUN = {**BASE, "batch_size": 2, "epochs": 3, "sync_bn": True, "keep_last": 3}


@pytest.mark.slow  # a whole run of 10-25 s; the default suite stays under ten minutes on two cores
def test_a_two_rank_checkpoint_resumes_on_one_process(folder, two_rank_run, tmp_path):
    out = tmp_path / "shrink"
    out.mkdir()
    shutil.copy(two_rank_run / "checkpoint-00000004.pth", out)  # the end of epoch 1
    summary = pretrain(load_config(None, {**FAULT_RUN, "data": folder, "epochs": 2, "out": str(out), "resume": "auto"}))
    # epoch 1: 4 steps of 4 images on 2 ranks; epoch 2: 8 steps of 2 images on 1 rank. The step
    # counter (and so the lr schedule) is re-expressed in the new effective batch: 16 images = 8 steps
    assert summary["images_seen"] == 32 and summary["steps"] == 16
    assert checkpoint_paths(out)[-1].name == "checkpoint-00000016.pth"


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes that a torchrun agent started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == agent_pid and b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
@pytest.mark.slow  # 27 s; resuming a checkpoint of two ranks is checked by default
# (test_a_two_rank_checkpoint_resumes_on_one_process), the restart by torchrun here
def test_a_killed_rank_fails_the_round_and_torchrun_restarts_from_the_last_checkpoint(folder, two_rank_run,
                                                                                       tmp_path):
    out, log = tmp_path / "faulty", tmp_path / "faulty.log"
    proc = torchrun(2, {**FAULT_RUN, "data": folder, "out": out}, log, extra=("--max-restarts=1",))
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-00000004.pth").exists():  # end of epoch 1
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    workers = _worker_pids(proc.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGKILL)
    assert proc.wait(300) == 0, log.read_text()[-3000:]  # the whole job succeeds after one restart
    text = log.read_text()
    assert "exitcode: -9" in text and "local_rank: 1" in text  # torchrun saw rank 1 die
    resumed = [json.loads(line) for line in text.splitlines() if line.startswith('{"event": "resume"')]
    assert len(resumed) == 1 and resumed[0]["step"] >= 4, resumed  # restarted from a checkpoint
    # and the restarted run ends exactly where an uninterrupted one does
    whole, faulty = final_model(two_rank_run), final_model(out)
    assert whole["step"] == faulty["step"] == 12
    for k, v in whole["model"].items():
        assert torch.equal(v, faulty["model"][k]), k
