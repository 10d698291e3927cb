"""Training checkpoints, the one module that writes and reads them: their names
(``checkpoint-<step>.pth``), what they hold (the model, the optimiser, the scaler, the
:class:`RunState` and the resolved config, all plain data), which are kept, and the weights a run
folder offers to evaluation and hand-off (:func:`weights_state`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import ConfigError, PretrainConfig
from .weights import CheckpointError, atomic_write, load_plain, read_weights, state_bytes

__all__ = ["CHECKPOINT_PATTERN", "CheckpointManager", "RunState", "checkpoint_paths", "checkpoint_step",
           "read_checkpoint", "weights_state"]

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
    """The backbone weights (original model keys) in a sparkmim run folder (its exported
    ``encoder.safetensors``, else its newest checkpoint), an exported ``.safetensors``/``.pth``
    file, or a pre-training checkpoint."""
    p = Path(source)
    if p.is_dir():
        if (p / "encoder.safetensors").is_file():
            p = p / "encoder.safetensors"
        else:
            ckpts = checkpoint_paths(p)
            if not ckpts:
                raise FileNotFoundError(f"{p} holds neither encoder.safetensors nor a checkpoint")
            p = ckpts[-1]
    if not p.is_file():
        raise FileNotFoundError(f"weights '{source}' not found (give 'random', 'pretrained' or a file/run folder)")
    return read_weights(p)


class CheckpointManager:
    """Training checkpoints in a run directory: ``checkpoint-<step>.pth``, written atomically
    (:func:`~sparkmim.weights.atomic_write`), the newest ``keep_last`` kept. Each holds plain data
    (tensors, numbers, strings, the resolved config) and loads with ``weights_only=True``."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    def paths(self) -> list[Path]:
        return checkpoint_paths(self.run_dir)

    def save(self, state: dict, step: int) -> Path:
        """Write ``checkpoint-<step>.pth``, then prune: the newest ``keep_last`` checkpoints up to
        this step stay (this one always among them); checkpoints of a later step are left over from
        before a resume from an earlier checkpoint, and go, so ``--resume auto`` continues this run."""
        path = atomic_write(self.run_dir / f"checkpoint-{step:08d}.pth", lambda tmp: torch.save(state, tmp),
                            state_bytes(state))
        older = [p for p in self.paths() if checkpoint_step(p) < step]
        later = [p for p in self.paths() if checkpoint_step(p) > step]
        for old in older[: max(0, len(older) - (self.keep_last - 1))] + later:
            old.unlink(missing_ok=True)
        return path

    def latest_readable(self, cfg: PretrainConfig | None = None) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, and its state; unreadable newer ones are skipped with a
        warning naming them. None when the directory holds no checkpoint."""
        for path in reversed(self.paths()):
            try:
                return path, self.load(path, cfg)
            except CheckpointError as e:
                warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
        return None

    @staticmethod
    def load(path: str | Path, cfg: PretrainConfig | None = None, state: object = None) -> dict:
        """Load a checkpoint (``state``: already read from ``path``); with ``cfg``, refuse one whose
        architecture settings differ. Raises :class:`~sparkmim.weights.CheckpointError` naming the
        file when it cannot be read."""
        state = read_checkpoint(path, state)
        if cfg is not None:
            saved = state.get("config", {})
            diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}"
                    for k in cfg.ARCHITECTURE if k in saved and saved[k] != getattr(cfg, k)]
            if diff:
                raise ConfigError(f"cannot resume from {path}: the configuration changed ({'; '.join(diff)}); "
                                 f"resume with the original settings or start a new run directory")
        return state


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
    def from_checkpoint(cls, state: dict, world: int, batch_size: int, effective_batch: int) -> RunState:
        """The state of a checkpoint, re-expressed for ``world`` ranks: with another world size the
        images already consumed this epoch (a prefix of the epoch's order) and the images seen are
        kept, rounded down to whole global batches. (Checkpoints written before ``bad_files`` and
        ``loss_last`` were saved load too.)"""
        run = cls(state["epoch"], state["batch"], state["step"], state["images_seen"], state.get("first_loss"),
                  state.get("loss_last"), dict(state.get("bad_files", {})), world)
        old_world = state.get("world", 1)
        if old_world != world:
            run.batch = run.batch * batch_size * old_world // (batch_size * world)
            run.step = run.images_seen // effective_batch
        return run
