"""A run's folder: who owns it, which checkpoint a resume starts from, and the disk its checkpoints
need. (The checkpoint files themselves: :mod:`sparkmim.checkpoint`.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path

from torch import nn

from ..checkpoint import CHECKPOINT_PATTERN, CheckpointManager, checkpoint_paths, checkpoint_step
from ..config import ConfigError, PretrainConfig
from ..sources import ReleasedRun, checkpoint_of, kind_of, read_source
from ..weights import state_bytes

__all__ = ["RUN_FILES", "FolderLock", "check_run_dir", "take_run_dir", "resume_checkpoint", "check_free_space",
           "checkpoint_bytes"]

# the files that make a folder a run's folder
RUN_FILES = ("config.yaml", "metrics.jsonl", "encoder.safetensors", "bad_images.txt", CHECKPOINT_PATTERN)


def _prior_run(run_dir: Path, cfg: PretrainConfig) -> tuple[list[str], bool]:
    """The run files ``run_dir`` holds, and whether this run continues the run they belong to
    (``--resume auto`` with a checkpoint there, or a checkpoint inside it named by ``--resume``)."""
    held = sorted(p.name for pattern in RUN_FILES for p in run_dir.glob(pattern)) if run_dir.is_dir() else []
    resume_inside = cfg.resume not in (None, "auto") and Path(cfg.resume).resolve().parent == run_dir.resolve()
    continuing = resume_inside or (cfg.resume == "auto" and bool(held) and bool(checkpoint_paths(run_dir)))
    return held, continuing


def check_run_dir(run_dir: Path, cfg: PretrainConfig, locked: bool = False) -> str | None:
    """Why ``run_dir`` cannot become this run's folder, or None; it changes nothing on disk
    (:func:`take_run_dir` does, once the run can start). A folder another run holds is refused,
    naming that run (``locked``: this process holds the folder's lock, so nothing is said twice).

    A folder holding another run's files is refused unless the run continues it (``--resume``
    auto, or a checkpoint inside it) or ``--overwrite`` moves the old run aside; a folder holding
    only the files of a run that never wrote a checkpoint is moved aside the same way when
    ``--resume auto`` starts afresh."""
    if not locked and (run_dir / FolderLock.NAME).is_file():
        probe = FolderLock(run_dir)
        try:
            holder = probe.acquire(record=False)
        except OSError:  # a lock file this user cannot open: the write test below speaks
            holder = None
        probe.release()
        if holder is not None:
            return _in_use(run_dir, holder)
    held, continuing = _prior_run(run_dir, cfg)
    if held and not continuing and not (cfg.overwrite or cfg.resume == "auto"):
        listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        return (f"{run_dir} already holds a run ({listed}): continue it with --resume auto, choose another "
                f"--out, or pass --overwrite to move the old run aside")
    if run_dir.is_dir():
        try:
            with tempfile.TemporaryFile(dir=run_dir):
                pass
        except OSError as e:
            return f"cannot write to the run folder {run_dir}: {e.strerror or e}"
    else:
        parent = next(p for p in run_dir.absolute().parents if p.exists())  # where the folder would be made
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            why = "it is not a folder" if not parent.is_dir() else "it is not writable"
            return f"cannot create the run folder {run_dir} in {parent}: {why}"
    if cfg.resume not in (None, "auto") and continuing and not locked:
        later = [p.name for p in checkpoint_paths(run_dir) if checkpoint_step(p) > checkpoint_step(Path(cfg.resume))]
        if later:
            warnings.warn(f"resuming from {cfg.resume}: the later checkpoints {', '.join(later)} belong to the "
                          f"run before this resume and are deleted when this run saves its first checkpoint",
                          stacklevel=2)
    return None


class FolderLock:
    """An exclusive OS lock on a run folder's ``.lock`` file (``flock``), which also names the
    process holding it. The operating system releases it when the process ends, however it ends,
    so a killed run leaves no stale lock; the file stays."""

    NAME = ".lock"

    def __init__(self, folder: Path):
        self.path = folder / self.NAME
        self._file = None

    def acquire(self, record: bool = True) -> str | None:
        """Take the lock (``record``: and write this process into the file); None when taken, else
        who holds it (as the lock file names them)."""
        try:
            import fcntl
        except ImportError:  # no flock on this platform: folders are not locked
            return None
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "sparkmim run"
            f.close()
            return holder
        if record:
            f.seek(0)
            f.truncate()
            f.write(f"sparkmim run, process {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
        self._file = f
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the lock
            self._file = None


def take_run_dir(run_dir: Path, cfg: PretrainConfig) -> FolderLock:
    """Make ``run_dir`` this run's folder and hold it (after :func:`check_run_dir` allowed it): the
    folder is made and locked (:class:`FolderLock`); a folder another run holds is refused, naming
    it; under the lock the folder is checked again (a run that started meanwhile is not moved
    aside), then an earlier run that this one does not continue is moved aside to
    ``OUT.old-<time>`` and the new folder is made and locked. Returns the lock, which the run
    releases when it ends."""
    made = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {run_dir}: {e.strerror or e}") from e
    lock = _lock(run_dir)
    problem = check_run_dir(run_dir, cfg, locked=True)
    if problem:
        lock.release()
        if made:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise ConfigError(problem)
    held, continuing = _prior_run(run_dir, cfg)
    if held and not continuing:
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        lock.release()
        print(json.dumps({"event": "overwrite", "note": f"the earlier run in {run_dir} was moved to {aside}"}),
              flush=True)
        try:
            run_dir.mkdir(parents=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run folder {run_dir}: {e.strerror or e}") from e
        lock = _lock(run_dir)
    return lock


def _lock(run_dir: Path) -> FolderLock:
    lock = FolderLock(run_dir)
    try:
        holder = lock.acquire()
    except OSError as e:
        raise ConfigError(f"cannot write to the run folder {run_dir}: {e.strerror or e}") from e
    if holder is not None:
        raise ConfigError(_in_use(run_dir, holder))
    return lock


def _in_use(run_dir: Path, holder: str) -> str:
    return f"{run_dir} is in use by another {holder}: wait for it to end, or choose another --out"


def resume_checkpoint(cfg: PretrainConfig, ckpts: CheckpointManager, main: bool):
    """What to resume from: for ``auto`` the newest readable checkpoint of the run folder (None
    when there is none), else what ``--resume`` names (:func:`~sparkmim.sources.read_source`): a
    training checkpoint, a run folder (its newest readable checkpoint) or one of the paper's
    released runs (:class:`~sparkmim.sources.ReleasedRun`); encoder weights are refused (they start
    a run with ``--init``). Refuses another per-device batch or accumulation (the data order and
    the schedule are counted in their batches)."""
    if cfg.resume == "auto":
        found = ckpts.latest_readable(cfg)
        if found is None and main:
            print(json.dumps({"event": "resume", "note": f"no checkpoint in {ckpts.run_dir}; starting fresh"}),
                  flush=True)
    else:
        source = read_source(cfg.resume)
        if isinstance(source, ReleasedRun):  # one of the paper's released checkpoints: the run continues it
            return source
        found = checkpoint_of(source, cfg)
        if found is None:
            raise ConfigError(f"--resume {cfg.resume} holds {kind_of(source)}, not a training checkpoint: start a "
                              f"run from them with --init {cfg.resume}", ["resume", "init"])
    if found is not None:
        saved = found.config
        was = (saved.get("batch_size", cfg.batch_size), saved.get("accum_steps", cfg.accum_steps))
        if was != (cfg.batch_size, cfg.accum_steps):
            raise ConfigError(f"cannot resume {found.path} with batch_size {cfg.batch_size} x accum_steps "
                              f"{cfg.accum_steps}: the run was started with batch_size {was[0]} x accum_steps "
                              f"{was[1]}; resume with --batch-size {was[0]} --accum-steps {was[1]}, or start a "
                              f"new --out")
    return found


def checkpoint_bytes(model: nn.Module) -> int:
    """About the size of one checkpoint: weights and buffers, and two LAMB moments per trained
    parameter."""
    weights = state_bytes(model.state_dict())
    return weights + 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def check_free_space(run_dir: Path, model: nn.Module, keep_last: int) -> int:
    """Warn when the disk cannot hold the checkpoints this run keeps (``keep_last`` of them, one
    being written and the exported weights); returns the bytes of one checkpoint."""
    each = checkpoint_bytes(model)
    need = each * (keep_last + 1) + state_bytes(model.state_dict())
    free = shutil.disk_usage(run_dir).free
    if free < need:
        warnings.warn(f"{run_dir} has {free / 2**20:,.0f} MiB free, but this run's checkpoints need about "
                      f"{need / 2**20:,.0f} MiB ({keep_last} kept + 1 being written, {each / 2**20:,.0f} "
                      f"MiB each); free space or lower --keep-last", stacklevel=2)
    return each
