"""A new user's faults and messy folders, driven through the command line: runs never mix,
unreadable files are counted once, bad values and broken files end in one clear line (exit 2, no
traceback), a full disk leaves no partial file.

What a user sees printed (warnings, the file-size limit of a full disk) is checked in a
subprocess; the other cases call the CLI's ``main`` in this process, where a traceback would be
an exception escaping it (and a subprocess would cost seconds of start-up per case)."""

import contextlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import write_noise_images
from sparkmim.checkpoint import CheckpointManager, checkpoint_paths

TINY = ["--model", "resnet10t", "--input-size", "64", "--decoder-width", "32", "--batch-size", "4",
        "--workers", "0", "--epochs", "1", "--warmup-epochs", "0", "--tensorboard", "false", "--progress", "false",
        "--log-every-steps", "1"]


def sparkmim(*args, limit_file_bytes: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m sparkmim ARGS`` in a fresh process; optionally with a cap on the size of any
    file it writes (a full disk, as the process sees it)."""

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run([sys.executable, "-m", "sparkmim", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap if limit_file_bytes else None,
                          env={**os.environ, "PYTHONWARNINGS": "default"})


class Result:
    """What ``main(argv)`` returned and printed, shaped like a finished subprocess."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """``cli(*args)``: the command line in this process; an exception escaping ``main`` fails the test."""
    from sparkmim.cli import main

    def run(*args) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def one_line_error(result, *fragments: str) -> str:
    """The process failed with exit 2 and exactly one error line holding every fragment, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def summary_of(result) -> dict:
    """The last stdout line: the run summary, which must be strict JSON (no NaN)."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1],
                      parse_constant=lambda c: pytest.fail(f"summary holds {c}, not JSON"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_noise_images(tmp_path_factory.mktemp("imgs"), 8, (70, 90), seed=1, suffix=".png")


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    """A finished one-epoch run (2 steps) and its summary."""
    from sparkmim.cli import main

    out, printed = tmp_path_factory.mktemp("runs") / "done", io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["pretrain", *TINY, "--data", str(images), "--out", str(out)])
    return out, summary_of(Result(code, printed.getvalue(), ""))


def test_a_folder_that_holds_a_run_is_refused_and_overwrite_moves_it_aside(images, finished, tmp_path, cli):
    out, _ = finished
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    one_line_error(cli("pretrain", *TINY, "--data", images, "--out", out),
                   f"{out} already holds a run", "--resume auto", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    # a copy of the finished run, overwritten: the old run is moved aside whole
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(out), str(copy)], check=True)
    summary = summary_of(cli("pretrain", *TINY, "--data", images, "--out", copy, "--overwrite", "true",
                             "--seed", "1"))
    (aside,) = tmp_path.glob("copy.old-*")
    assert sorted(p.name for p in aside.iterdir()) == sorted(before)
    assert summary["steps"] == 2 and [p.name for p in CheckpointManager(copy).paths()] == ["checkpoint-00000002.pth"]
    assert yaml.safe_load((copy / "config.yaml").read_text())["seed"] == 1


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """Checkpoints of a later step are left over from before a resume from an earlier one: the
    new run's checkpoint stays, they go (so --resume auto continues the new run)."""
    ckpts = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 11, 12):
        ckpts.save({"model": {}, "step": step}, step)
    assert [p.name for p in ckpts.paths()] == ["checkpoint-00000011.pth", "checkpoint-00000012.pth"]
    ckpts.save({"model": {}, "step": 5}, 5)
    assert [p.name for p in ckpts.paths()] == ["checkpoint-00000005.pth"]
    for step in (6, 7):
        ckpts.save({"model": {}, "step": step}, step)
    assert [p.name for p in ckpts.paths()] == ["checkpoint-00000006.pth", "checkpoint-00000007.pth"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow  # 10-13 s of whole runs; the default suite stays under ten minutes
def test_a_cluster_of_unreadable_files_is_counted_once_per_file(tmp_path):
    """13 readable images and, in one sub-folder, 2 truncated JPEGs (13 %): the run finishes over
    2 epochs, bad_images counts 2 distinct files, each announced on one line once and listed in
    bad_images.txt."""
    data = tmp_path / "data"
    (data / "ok").mkdir(parents=True)
    (data / "broken").mkdir()
    write_noise_images(data / "ok", 13, (70, 90), seed=2, suffix=".jpg")
    buf = io.BytesIO()
    Image.new("RGB", (80, 80), (9, 99, 199)).save(buf, "JPEG")
    for i in range(2):
        (data / "broken" / f"cut{i}.jpg").write_bytes(buf.getvalue()[:150])
    out = tmp_path / "run"
    result = sparkmim("pretrain", *TINY, "--data", data, "--out", out, "--epochs", "2", "--log-every-steps", "100")
    summary = summary_of(result)
    assert summary["bad_images"] == 2 and summary["steps"] == 6
    announced = [line for line in result.stderr.splitlines() if "skipping unreadable image" in line]
    assert sorted(Path(line.split()[6]).name for line in announced) == ["cut0.jpg", "cut1.jpg"]
    assert all(line.startswith("sparkmim pretrain: warning: ") for line in announced)  # one line each
    listed = [line.split("\t")[0] for line in (out / "bad_images.txt").read_text().splitlines()]
    assert sorted(Path(p).name for p in listed) == ["cut0.jpg", "cut1.jpg"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["bad_images"] == 2


def test_a_file_list_with_missing_paths(images, tmp_path, cli):
    names = sorted(p.name for p in images.iterdir())
    gone = tmp_path / "gone.txt"
    gone.write_text("a.png\nb.png\nc.png\n")
    one_line_error(cli("pretrain", *TINY, "--data", gone, "--out", tmp_path / "o1"),
                   "none of the 3 files listed in", "a.png")
    some = tmp_path / "some.txt"
    some.write_text("".join(f"{images / n}\n" for n in names) + "missing.png\n")
    summary = summary_of(cli("pretrain", *TINY, "--data", some, "--out", tmp_path / "o2"))
    assert summary["bad_images"] == 1 and summary["steps"] == 2
    assert (tmp_path / "o2" / "bad_images.txt").read_text().startswith(str(tmp_path / "missing.png"))


def test_mostly_unreadable_data_stops_in_one_line(tmp_path, cli):
    for i in range(14):
        (tmp_path / f"broken{i:02d}.jpg").write_bytes(b"garbage")
    write_noise_images(tmp_path, 2, (64, 64), seed=3)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        result = cli("pretrain", *TINY, "--data", tmp_path, "--out", tmp_path / "out", "--epochs", "2")
    one_line_error(result, "14 of the 16 image files read so far are unreadable", "--max-bad-fraction")


@pytest.mark.parametrize("flags,fragment", [
    (["--log-every-steps", "0"], "--log-every-steps must be >= 1, got 0"),
    (["--save-every-steps", "-1"], "--save-every-steps must be >= 0, got -1"),
    (["--decoder-width", "0"], "--decoder-width must be >= 1, got 0"),
    (["--decoder-width", "48"], "decoder width 48 must be divisible by 2**5"),
    (["--keep-last", "0"], "--keep-last must be >= 1"),
    (["--device", "gpu"], "unknown device 'gpu'; use cpu, cuda, cuda:N or auto"),
    (["--model", "vit_tiny_patch16_224"], "not a convolutional network sparkmim can make sparse"),
    (["--model", "botnet26t_256"], "failed in layer 'stages.2.1.self_attn' (BottleneckAttn)"),
])
def test_bad_values_and_models_fail_at_once_in_one_line(flags, fragment, images, tmp_path, cli):
    result = cli("pretrain", *TINY, "--data", images, "--out", tmp_path / "o", *flags)
    one_line_error(result, fragment)
    assert not list(tmp_path.glob("o/checkpoint-*"))


def test_zero_means_only_at_the_end(images, tmp_path, cli):
    out = tmp_path / "o"
    with pytest.warns(UserWarning, match=r"the warm-up \(6 steps, 3 epochs\) is not shorter than the run \(4 steps\)"):
        summary_of(cli("pretrain", *TINY, "--data", images, "--out", out, "--epochs", "2",
                       "--save-every-epochs", "0", "--vis-every-epochs", "0", "--warmup-epochs", "3"))
    assert [p.name for p in CheckpointManager(out).paths()] == ["checkpoint-00000004.pth"]
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == ["epoch0000_start.png", "epoch0002.png"]


def test_invalid_yaml_names_the_file(images, tmp_path, cli):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("model: resnet18\nepochs: [1, 2\n")
    one_line_error(cli("pretrain", "--config", bad, "--data", images), f"config file {bad} is not valid YAML")


def test_an_unwritable_output_folder_is_one_line(images, tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    one_line_error(cli("pretrain", *TINY, "--data", images, "--out", blocker / "run"), str(blocker))


def test_resume_with_another_batch_size_is_refused_and_a_finished_run_says_so(images, finished, cli):
    out, first = finished
    one_line_error(cli("pretrain", *TINY, "--data", images, "--out", out, "--resume", "auto", "--batch-size", "2"),
                   f"cannot resume the run in {out} with --batch-size 2: it was started with --batch-size 4",
                   "leave --batch-size out")
    again = cli("pretrain", *TINY, "--data", images, "--out", out, "--resume", "auto")
    summary = summary_of(again)
    assert "had already finished" in again.stdout and summary["steps"] == first["steps"] == 2
    assert summary["loss_first"] == first["loss_first"] and summary["loss_last"] == first["loss_last"]


@pytest.mark.slow  # whole runs; tests/test_sources.py holds the skip on hand-written checkpoints
def test_resume_skips_an_unreadable_newest_checkpoint(images, tmp_path, cli):
    out = tmp_path / "run"
    summary_of(cli("pretrain", *TINY, "--data", images, "--out", out, "--epochs", "2", "--keep-last", "2"))
    older, newest = CheckpointManager(out).paths()
    newest.write_bytes(newest.read_bytes()[:4096])  # truncated, as by a crash mid-copy
    one_line_error(cli("pretrain", *TINY, "--data", images, "--out", out, "--epochs", "2", "--resume", newest),
                   f"cannot read checkpoint {newest}")
    resumed = sparkmim("pretrain", *TINY, "--data", images, "--out", out, "--epochs", "2", "--resume", "auto")
    summary = summary_of(resumed)
    assert f"cannot read checkpoint {newest}" in resumed.stderr and "trying the previous checkpoint" in resumed.stderr
    assert f'"checkpoint": "{older}"' in resumed.stdout and summary["steps"] == 4
    state = torch.load(checkpoint_paths(out)[-1], weights_only=True)  # the truncated one was replaced
    assert state["step"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # lines after the checkpoint were logged once, not twice
    export = cli("export", out)
    assert export.returncode == 0 and json.loads(export.stdout.splitlines()[-1])["checkpoint"].endswith("04.pth")


@pytest.mark.slow  # 10-13 s of whole runs; the default suite stays under ten minutes
def test_a_full_disk_fails_in_one_line_and_leaves_no_partial_file(images, tmp_path):
    out = tmp_path / "run"
    line = one_line_error(sparkmim("pretrain", *TINY, "--data", images, "--out", out,
                                   limit_file_bytes=2 * 2**20),
                          f"could not write {out / 'checkpoint-00000002.pth'}", "MiB needed")
    assert "the disk is full or a file-size limit was reached" in line
    assert not list(out.glob("*.tmp")) and not CheckpointManager(out).paths()


def test_reconstruct_on_an_unreadable_image_and_file_modes(finished, tmp_path, cli):
    out, _ = finished
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    one_line_error(cli("reconstruct", out, broken, "--out", tmp_path / "grid.png"), f"cannot read image {broken}")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("encoder.safetensors", "config.yaml", "checkpoint-00000002.pth"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_too_little_free_space_is_warned_at_start(monkeypatch, tmp_path):
    import shutil

    from sparkmim import SparK, SparseEncoder
    from sparkmim.train.folder import check_free_space

    model = SparK(SparseEncoder.from_timm("resnet10t"), decoder_width=32)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.warns(UserWarning, match=r"has 1 MiB free, but this run's checkpoints need about \d+ MiB \(3 kept"):
        check_free_space(tmp_path, model, keep_last=3)


# -- faults a new user met at bedecd1 ---------------------------------------------------------------

def test_when_every_file_is_unreadable_the_distinct_files_are_counted(tmp_path, cli):
    """10 truncated JPEGs: the error counts 10 files (not the 65 tries of a loop that went round the
    folder); one NaN volume with batch 1 is named as the only volume file."""
    buf = io.BytesIO()
    Image.new("RGB", (80, 80), (9, 99, 199)).save(buf, "JPEG")
    data = tmp_path / "cut"
    data.mkdir()
    for i in range(10):
        (data / f"cut{i}.jpg").write_bytes(buf.getvalue()[:150])
    one_line_error(cli("pretrain", *TINY, "--data", data, "--out", tmp_path / "o1"),
                   "none of the 10 image files can be read", "cut0.jpg")
    assert not (tmp_path / "o1").exists()  # nothing is written before the data has passed its checks
    pytest.importorskip("monai")
    volumes = tmp_path / "nan"
    volumes.mkdir()
    import numpy as np

    arr = np.zeros((32, 32, 32), np.float32)
    arr[3, 4, 5] = np.nan
    np.save(volumes / "nan.npy", arr)
    result = cli("pretrain", "--model", "monai:resnet10", "--in-chans", "1", "--input-size", "32", "--decoder-width",
                 "32", "--batch-size", "1", "--workers", "0", "--epochs", "1", "--progress", "false",
                 "--data", volumes, "--out", tmp_path / "o2")
    one_line_error(result, "the only volume file cannot be read", "nan.npy", "NaN or infinite voxels")


def test_listed_but_missing_files_are_each_announced_once(images, tmp_path, cli):
    """A file list naming 10 missing paths among 25: each missing file gets one warning line, is
    listed in bad_images.txt and counted."""
    (tmp_path / "more").mkdir()
    more = write_noise_images(tmp_path / "more", 7, (70, 90), seed=4)
    present = sorted(images.iterdir()) + sorted(more.iterdir())
    listing = tmp_path / "list.txt"
    missing = [tmp_path / f"gone{i}.png" for i in range(10)]
    listing.write_text("".join(f"{p}\n" for p in present + missing))
    assert len(present) + len(missing) == 25
    with pytest.warns(UserWarning) as caught:
        summary = summary_of(cli("pretrain", *TINY, "--data", listing, "--out", tmp_path / "run"))
    announced = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert sorted(a.split()[3] for a in announced) == sorted(map(str, missing))  # each once
    listed = [line.split("\t")[0] for line in (tmp_path / "run" / "bad_images.txt").read_text().splitlines()]
    assert sorted(listed) == sorted(map(str, missing)) and summary["bad_images"] == 10


class Payload:
    """Unpickling this runs code: it creates the file named ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_files_that_are_not_plain_data_are_refused_and_nothing_in_them_runs(images, finished, tmp_path, cli):
    """A .pth holding a Python object that would run code when loaded: --init, --resume, export and
    evaluate refuse it in one line (exit 2) in sparkmim's words, and the code never runs."""
    out, _ = finished
    marker = tmp_path / "ran"
    state = torch.load(checkpoint_paths(out)[-1], weights_only=True)
    bad = tmp_path / "bad.pth"
    torch.save({**state, "extra": Payload(marker)}, bad)
    labelled = tmp_path / "labelled"
    for name in ("a", "b"):
        (labelled / name).mkdir(parents=True)
        write_noise_images(labelled / name, 4, (40, 40), seed=len(name))
    for args in (["pretrain", *TINY, "--data", images, "--out", tmp_path / "a", "--init", bad],
                 ["pretrain", *TINY, "--data", images, "--out", tmp_path / "b", "--resume", bad],
                 ["export", bad],
                 ["evaluate", "knn", "--model", "resnet10t", "--data", labelled, "--weights", bad, "--workers", "0",
                  "--progress", "false", "--out", tmp_path / "eval"]):
        line = one_line_error(cli(*args), f"{bad} holds Python objects besides tensors, numbers and strings",
                              "(it names ", "refused", "torch.save(model.state_dict(), FILE)")
        assert "weights_only" not in line and "Weights only load failed" not in line
    assert not marker.exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_boolean_flags_take_the_bare_form(images, finished, tmp_path, cli):
    """``--overwrite`` alone means true (the refusal suggests it), as ``--overwrite true`` does."""
    from sparkmim.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--overwrite", "--progress", "false", "--sparse"])
    assert (args.overwrite, args.progress, args.sparse, args.tensorboard) == (True, False, True, None)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(finished[0]), str(copy)], check=True)
    summary = summary_of(cli("pretrain", *TINY, "--data", images, "--out", copy, "--overwrite"))
    assert summary["steps"] == 2 and len(list(tmp_path.glob("copy.old-*"))) == 1


@pytest.mark.parametrize("flags", [["--decoder-width", "48"], ["--model", "resnet5O"], ["--data", "/no/such/folder"],
                                   ["--input-size", "72"]])
def test_a_start_that_fails_leaves_no_run_folder(flags, images, finished, tmp_path, cli):
    out = tmp_path / "never"
    assert cli("pretrain", *TINY, "--data", images, "--out", out, *flags).returncode == 2
    assert not out.exists()
    # nor does it move an earlier run aside
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(finished[0]), str(copy)], check=True)
    assert cli("pretrain", *TINY, "--data", images, "--out", copy, "--overwrite", *flags).returncode == 2
    assert not list(tmp_path.glob("copy.old-*")) and (copy / "config.yaml").is_file()


# -- faults a new user met at a0a6c38 --------------------------------------------------------------

def test_resume_by_name_takes_the_runs_own_settings(finished, tmp_path, cli):
    """``sparkmim pretrain --out RUN --resume auto`` needs no other flag: the run's settings come from
    its config.yaml; --epochs may change, another --model is refused naming the flag; the Python
    API resumes the same way."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(finished[0]), str(copy)], check=True)
    line = one_line_error(cli("pretrain", "--out", copy, "--resume", "auto", "--model", "resnet18"),
                          f"cannot resume the run in {copy} with --model resnet18: it was started with --model resnet10t",
                          "leave --model out")
    assert "--epochs" in line
    summary = summary_of(cli("pretrain", "--out", copy, "--resume", "auto", "--epochs", "2", "--progress", "false"))
    assert summary["steps"] == 4 and summary["loss_first"] == finished[1]["loss_first"]
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    assert (saved["model"], saved["epochs"], saved["input_size"], saved["decoder_width"]) == ("resnet10t", 2, 64, 32)
    import sparkmim

    again = sparkmim.pretrain(out=str(copy), resume="auto", epochs=3, progress=False)
    assert again["steps"] == 6


def test_resume_auto_on_a_folder_without_a_run_and_no_data_is_an_error(tmp_path, cli):
    """A mistyped --out with --resume auto names the folder instead of starting a long run on the
    demo photographs; without --data and without a run to resume nothing starts."""
    typo = tmp_path / "typo"
    one_line_error(cli("pretrain", "--resume", "auto", "--out", typo), f"{typo} holds no run to resume",
                   "give --data to start a new run there")
    one_line_error(cli("pretrain", "--out", typo), "no data: give --data", "--data demo")
    assert not typo.exists()


def test_a_folder_held_by_a_live_run_is_refused_and_a_killed_run_leaves_no_lock(images, tmp_path, cli):
    """A run holds its folder with an OS lock: a second run into it is refused in one line naming
    the process; a process killed while holding it leaves the folder free."""
    from sparkmim.train.folder import FolderLock

    out = tmp_path / "held"
    out.mkdir()
    lock = FolderLock(out)
    assert lock.acquire() is None
    one_line_error(cli("pretrain", *TINY, "--data", images, "--out", out),
                   f"{out} is in use by another sparkmim run, process {os.getpid()}", "choose another --out")
    lock.release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from sparkmim.train.folder import FolderLock; lock = FolderLock(Path(sys.argv[1])); lock.acquire(); "
                               "print('held', flush=True); time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    one_line_error(cli("pretrain", *TINY, "--data", images, "--out", out), f"process {holder.pid}")
    holder.kill()
    holder.wait()
    assert summary_of(cli("pretrain", *TINY, "--data", images, "--out", out))["steps"] == 2


@pytest.mark.slow  # a whole run of 10-25 s; the default suite stays under ten minutes on two cores
def test_two_runs_started_at_once_into_one_folder_never_mix(images, tmp_path):
    """Two identical runs into one new folder at the same time: one finishes; the other is refused
    in one line (the folder is in use, or already holds the first run); nothing is moved aside."""
    out = tmp_path / "same"
    cmd = [sys.executable, "-m", "sparkmim", "pretrain", *TINY, "--data", str(images), "--out", str(out)]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [Result(p.wait(timeout=300), *p.communicate()) for p in runs]
    ok = [r for r in results if r.returncode == 0]
    refused = [r for r in results if r.returncode != 0]
    assert len(ok) == 1 and len(refused) == 1, [r.stderr[-500:] for r in results]
    line = one_line_error(refused[0])
    assert "is in use by another sparkmim run" in line or "already holds a run" in line, line
    assert summary_of(ok[0])["steps"] == 2 and not list(tmp_path.glob("same.old-*"))
    assert [p.name for p in CheckpointManager(out).paths()] == ["checkpoint-00000002.pth"]


def test_a_write_into_a_vanished_folder_is_not_called_a_full_disk(tmp_path):
    import shutil

    from sparkmim.weights import WriteError, atomic_write

    folder = tmp_path / "run"
    folder.mkdir()

    def write(tmp):
        shutil.rmtree(folder)  # the folder moved away mid-write, as by another process
        tmp.write_text("x")

    with pytest.raises(WriteError) as caught:
        atomic_write(folder / "config.yaml", write)
    message = str(caught.value)
    assert f"the folder {folder} no longer exists" in message
    assert "MiB" not in message and "disk" not in message


def test_single_files_and_the_wrong_kind_of_data_are_named(images, tmp_path, cli):
    """One image as --data; volumes given to a 2-D model and images to a 3-D one (a folder, a file,
    and reconstruct of a 2-D run): one line each saying what the data are and which --model fits."""
    import numpy as np

    one = sorted(images.iterdir())[0]
    one_line_error(cli("pretrain", *TINY, "--data", one, "--out", tmp_path / "a"),
                   f"--data {one} is a single file: give a folder of images", "text file listing their paths")
    volumes = tmp_path / "vols"
    volumes.mkdir()
    np.save(volumes / "scan.npy", np.zeros((8, 8, 8), np.float32))
    one_line_error(cli("pretrain", *TINY, "--data", volumes, "--out", tmp_path / "b"),
                   f"{volumes} holds volumes, and resnet10t is a 2-D model that takes images: choose a 3-D model")
    one_line_error(cli("pretrain", *TINY, "--data", volumes / "scan.npy", "--out", tmp_path / "c"),
                   "scan.npy is a volume, and resnet10t is a 2-D model")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    one_line_error(cli("pretrain", *TINY, "--data", binary, "--out", tmp_path / "d"),
                   f"--data {binary} is neither a folder nor a text file of paths")
    pytest.importorskip("monai")
    one_line_error(cli("pretrain", "--model", "monai:resnet10", "--in-chans", "1", "--data", images, "--out",
                       tmp_path / "e"),
                   f"{images} holds images, and monai:resnet10 is a 3-D model that takes volumes: choose a 2-D model")
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_a_model_typo_is_named_before_the_data_are_counted(images, tmp_path, cli):
    """A mistyped --model and too few images for the batch: the typo is what the user learns first."""
    one_line_error(cli("pretrain", *TINY, "--model", "resnet5O", "--batch-size", "64", "--data", images, "--out",
                       tmp_path / "o"), "unknown timm model 'resnet5O'")


def test_a_small_data_set_runs_with_a_batch_it_fills(tmp_path, cli):
    """Three images and no --batch-size (the default is 32): the run takes a batch of 3 and says so;
    a batch size the user gives is kept (and refused when the data cannot fill it)."""
    (tmp_path / "three").mkdir()
    three = write_noise_images(tmp_path / "three", 3, (70, 90), seed=5)
    flags = [f for f in TINY if f not in ("--batch-size", "4")]
    with pytest.warns(UserWarning, match="the data set has 3 images, fewer than one batch of 32: this run uses "
                                         "--batch-size 3"):
        summary = summary_of(cli("pretrain", *flags, "--data", three, "--out", tmp_path / "o"))
    assert summary["steps"] == 1 and yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())["batch_size"] == 3
    one_line_error(cli("pretrain", *TINY, "--data", three, "--out", tmp_path / "p"), "3 images are fewer than one batch of 4")


def test_a_subcommand_typo_gets_a_suggestion_and_argparse_errors_are_short(capsys):
    from sparkmim.cli import main

    for argv, want in ((["pretrian"], "did you mean pretrain?"), (["pretrain", "--epochs", "many"], "--epochs")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and want in err, err
        assert len(err.strip().splitlines()) <= 3, err


def test_init_pretrained_without_a_network_is_one_line(images, tmp_path, cli, monkeypatch):
    """Offline, the published weights cannot be fetched: one line in sparkmim's words saying how to
    pass them as a file, not the hub's retries."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = cli("pretrain", *TINY, "--init", "pretrained", "--data", images, "--out", tmp_path / "o")
    one_line_error(result, "could not fetch the published weights of resnet10t", "--init FILE", "local-dir:FOLDER")
    assert "Retrying" not in result.stderr


def test_a_torchvision_that_does_not_fit_torch_is_one_line(tmp_path):
    """A torchvision built for another torch fails at import ('operator torchvision::nms does not
    exist'); the demo says in one line which pair to reinstall."""
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "sparkmim", "demo", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=300, env=env)
    line = one_line_error(done, "does not work with the installed torch", "operator torchvision::nms does not exist",
                          "reinstall the pair together, e.g. pip install torch==")
    assert "'torchvision==0." in line
