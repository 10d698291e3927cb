"""Kept for code written against earlier releases: weight files now live in
:mod:`sparkmim.weights`, training checkpoints in :mod:`sparkmim.train.checkpoint`."""

from .train.checkpoint import CheckpointManager
from .weights import (
    CheckpointError,
    KeyMismatchError,
    WriteError,
    atomic_write,
    key_report,
    load_encoder_weights,
    read_weights,
    save_encoder_weights,
    state_bytes,
)

__all__ = ["CheckpointManager", "CheckpointError", "KeyMismatchError", "WriteError", "atomic_write", "key_report",
           "load_encoder_weights", "read_weights", "save_encoder_weights", "state_bytes"]
