"""Pre-training: set-up (``setup``), one step (``loop``), checkpoints and run state
(``checkpoint``), metrics (``metrics``) and the run itself (``run``)."""

from ..checkpoint import CheckpointManager, RunState
from .loop import NonFiniteLossError, StepStats, apply_schedule, optimizer_step, train_step
from .run import Run, pretrain
from .setup import (
    autocast_for,
    build_model,
    build_optimizer,
    resolve_device,
    resolve_precision,
)

__all__ = ["pretrain", "Run", "train_step", "optimizer_step", "apply_schedule", "StepStats", "NonFiniteLossError",
           "CheckpointManager", "RunState", "build_model", "build_optimizer", "autocast_for",
           "resolve_device", "resolve_precision"]
