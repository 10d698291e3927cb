"""Training checkpoints, the one module that writes and reads them: their names
(``checkpoint-<step>.pth``), what they hold (:class:`RunCheckpoint`: the model, the optimiser,
the scaler, the :class:`RunState`, the resolved config and the normalisation statistics, all
plain data) and which are kept. (What any file or folder a user names is: :mod:`sparkmim.sources`.)"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import ConfigError, PretrainConfig
from .weights import CheckpointError, atomic_write, encoder_weights, load_plain, state_bytes

__all__ = ["CHECKPOINT_PATTERN", "CheckpointManager", "RunCheckpoint", "RunState", "checkpoint_paths",
           "checkpoint_step", "read_checkpoint", "weights_state"]

CHECKPOINT_PATTERN = "checkpoint-*.pth"


def checkpoint_step(path: Path) -> int:
    """The step of ``checkpoint-<step>.pth``; -1 for another name."""
    try:
        return int(Path(path).stem.split("-")[1])
    except (IndexError, ValueError):
        return -1


def checkpoint_paths(folder: str | Path) -> list[Path]:
    """The training checkpoints of a run folder, oldest step first."""
    return sorted((p for p in Path(folder).glob(CHECKPOINT_PATTERN) if checkpoint_step(p) >= 0), key=checkpoint_step)


def read_checkpoint(path: str | Path, state: object = None) -> dict:
    """A training checkpoint's plain data (``weights_only=True``; ``state``: what was already read
    from ``path``); :class:`CheckpointError` naming the file when it cannot be read or is not a
    sparkmim checkpoint."""
    state = load_plain(path, "checkpoint") if state is None else state
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"cannot read checkpoint {path}: not a sparkmim training checkpoint")
    return state


def weights_state(source: str | Path) -> dict[str, Tensor]:
    """The backbone weights (original model keys) of whatever ``source`` is
    (:func:`sparkmim.sources.read_source`); kept for callers of earlier versions."""
    from .sources import backbone_weights_of  # the reader of user files stands above this module

    return backbone_weights_of(source)


class CheckpointManager:
    """Training checkpoints in a run directory: ``checkpoint-<step>.pth``, written atomically
    (:func:`~sparkmim.weights.atomic_write`), the newest ``keep_last`` kept. Each holds plain data
    (tensors, numbers, strings, the resolved config) and loads with ``weights_only=True``."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    def paths(self) -> list[Path]:
        return checkpoint_paths(self.run_dir)

    def save(self, checkpoint: RunCheckpoint | dict, step: int | None = None) -> Path:
        """Write ``checkpoint-<step>.pth`` (``checkpoint``: a :class:`RunCheckpoint`, whose step is
        its own, or plain data), then prune: the newest ``keep_last`` checkpoints up to this step
        stay (this one always among them); checkpoints of a later step are left over from before a
        resume from an earlier checkpoint, and go, so ``--resume auto`` continues this run."""
        if isinstance(checkpoint, RunCheckpoint):
            step, state = checkpoint.progress.step, checkpoint.to_state()
        else:
            state = checkpoint
        path = atomic_write(self.run_dir / f"checkpoint-{step:08d}.pth", lambda tmp: torch.save(state, tmp),
                            state_bytes(state))
        older = [p for p in self.paths() if checkpoint_step(p) < step]
        later = [p for p in self.paths() if checkpoint_step(p) > step]
        for old in older[: max(0, len(older) - (self.keep_last - 1))] + later:
            old.unlink(missing_ok=True)
        return path

    def latest_readable(self, cfg: PretrainConfig | None = None) -> RunCheckpoint | None:
        """The newest checkpoint that loads; unreadable newer ones are skipped with a warning naming
        them. None when the directory holds no checkpoint."""
        for path in reversed(self.paths()):
            try:
                return self.load(path, cfg)
            except CheckpointError as e:
                warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
        return None

    @staticmethod
    def load(path: str | Path, cfg: PretrainConfig | None = None, state: object = None) -> RunCheckpoint:
        """Load a checkpoint (``state``: already read from ``path``); with ``cfg``, refuse one whose
        architecture settings differ. Raises :class:`~sparkmim.weights.CheckpointError` naming the
        file when it cannot be read."""
        checkpoint = RunCheckpoint.from_state(path, read_checkpoint(path, state))
        if cfg is not None:
            checkpoint.check_settings(cfg)
        return checkpoint


@dataclass
class RunState:
    """Where a run stands, as saved in its checkpoints (beside the model, optimiser and scaler).

    ``epoch`` is the epoch to continue in and ``batch`` the batches of it this rank has consumed;
    ``images_seen`` counts positions of the data order over all ranks (unreadable files included);
    ``bad_files`` maps each distinct unreadable file to the reason."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    images_seen: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    bad_files: dict[str, str] = field(default_factory=dict)
    world: int = 1

    def to_checkpoint(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "images_seen": self.images_seen,
                "bad_images": len(self.bad_files), "bad_files": dict(self.bad_files), "first_loss": self.first_loss,
                "loss_last": self.last_loss, "world": self.world}

    @classmethod
    def from_state(cls, state: dict) -> RunState:
        """The fields of a checkpoint's plain data (checkpoints written before ``bad_files``,
        ``loss_last`` and ``world`` were saved read too; a state dict with a ``model`` and a
        ``step`` only is at the start of its epoch 0)."""
        return cls(int(state.get("epoch", 0)), int(state.get("batch", 0)), int(state["step"]),
                   int(state.get("images_seen", 0)),
                   state.get("first_loss"), state.get("loss_last"), dict(state.get("bad_files", {})),
                   int(state.get("world", 1)))

    def for_world(self, world: int, batch_size: int, effective_batch: int) -> RunState:
        """This state re-expressed for ``world`` ranks: with another world size the images already
        consumed this epoch (a prefix of the epoch's order) and the images seen are kept, rounded
        down to whole global batches."""
        run = RunState(self.epoch, self.batch, self.step, self.images_seen, self.first_loss, self.last_loss,
                       dict(self.bad_files), world)
        if self.world != world:
            run.batch = run.batch * batch_size * self.world // (batch_size * world)
            run.step = run.images_seen // effective_batch
        return run


@dataclass
class RunCheckpoint:
    """A training checkpoint: what :class:`CheckpointManager` writes and reads. ``config`` is the
    resolved config as saved (a plain dict, so a checkpoint of another version still reads);
    ``window``: the sums of the metric line in progress (None in older checkpoints);
    ``norm_mean`` / ``norm_std``: the run's input normalisation (None in older checkpoints)."""

    path: Path | None
    model: dict[str, Tensor]
    optimizer: dict
    scaler: dict
    progress: RunState
    config: dict
    window: dict | None = None
    norm_mean: list[float] | None = None
    norm_std: list[float] | None = None

    def to_state(self) -> dict:
        """The plain data written to the file (the layout every earlier version wrote)."""
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler, "window": self.window,
                **self.progress.to_checkpoint(), "config": self.config,
                "norm_mean": self.norm_mean, "norm_std": self.norm_std}

    @classmethod
    def from_state(cls, path: str | Path | None, state: dict) -> RunCheckpoint:
        """A checkpoint's plain data (as :func:`read_checkpoint` returns it) as a RunCheckpoint."""
        return cls(None if path is None else Path(path), state["model"], state.get("optimizer", {}),
                   state.get("scaler", {}), RunState.from_state(state), dict(state.get("config") or {}),
                   state.get("window"), state.get("norm_mean"), state.get("norm_std"))

    @property
    def architecture(self) -> str | None:
        """The run's ``--model``."""
        model = self.config.get("model")
        return model if isinstance(model, str) else None

    def pretrain_config(self) -> PretrainConfig:
        """The run's settings as this version's config (options it does not know are left out;
        ``init`` is cleared: the weights are the checkpoint's)."""
        from dataclasses import fields

        known = {f.name for f in fields(PretrainConfig)}
        return PretrainConfig(**{**{k: v for k, v in self.config.items() if k in known}, "init": None})

    def stats(self) -> tuple[list[float], list[float]]:
        """The input normalisation of the run (older checkpoints: the default for its channels)."""
        if self.norm_mean is not None and self.norm_std is not None:
            return list(self.norm_mean), list(self.norm_std)
        from .data import default_stats

        mean, std = default_stats(int(self.config.get("in_chans", 3)))
        return list(mean), list(std)

    def backbone_weights(self) -> dict[str, Tensor]:
        """The backbone's weights, with its own keys."""
        return encoder_weights(self.model)

    def check_settings(self, cfg: PretrainConfig) -> None:
        """Refuse to resume with architecture settings other than the checkpoint's."""
        diff = [f"{k}: checkpoint {self.config.get(k)!r} vs now {getattr(cfg, k)!r}"
                for k in cfg.ARCHITECTURE if k in self.config and self.config[k] != getattr(cfg, k)]
        if diff:
            raise ConfigError(f"cannot resume from {self.path}: the configuration changed ({'; '.join(diff)}); "
                              f"resume with the original settings or start a new run directory")
