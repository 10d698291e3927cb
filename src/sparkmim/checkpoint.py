"""Saving and loading encoder weights with the original model's keys; training checkpoints."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["save_encoder_weights", "load_encoder_weights", "KeyMismatchError", "key_report", "atomic_write",
           "WriteError", "CheckpointError", "CheckpointManager", "state_bytes"]


class KeyMismatchError(ValueError):
    """Weights whose keys or shapes do not match the target model."""


class WriteError(OSError):
    """A file could not be written (disk full, no permission); nothing partial was left behind."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint)."""


def state_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state: about the size of its file."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None], expected_bytes: int = 0) -> Path:
    """Write ``path`` through ``write(tmp)`` on a temporary file beside it, flushed to disk,
    given the usual permissions (0666 less the umask), then renamed over ``path``: a reader sees
    the old file or the new one, never a partial one. On failure (disk full, no permission) the
    temporary file is removed and :class:`WriteError` names the path, the bytes needed and the
    bytes free."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MiB free"
        except OSError:
            free = "free space unknown"
        need = f"about {expected_bytes / 2**20:,.1f} MiB needed, " if expected_bytes else ""
        reason = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, RuntimeError) and "inline_container" in reason:  # torch.save's report of a short write
            reason = f"the write stopped part-way: the disk is full or a file-size limit was reached ({reason})"
        raise WriteError(f"could not write {path} ({need}{free}): {reason}") from e
    return path


def _plain(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # clone: safetensors refuses tensors that share storage or are not contiguous
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def save_encoder_weights(model: nn.Module, path: str | Path) -> Path:
    """Write ``model.state_dict()`` to ``path`` (``.safetensors``, or ``.pth`` / ``.pt`` via torch.save),
    atomically (temporary file, then rename)."""
    from .encoder import SparseEncoder

    if isinstance(model, SparseEncoder):
        model = model.model
    path = Path(path)
    state = _plain(model.state_dict())
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(state, str(tmp)), state_bytes(state))
    return atomic_write(path, lambda tmp: torch.save(state, tmp), state_bytes(state))


def read_weights(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def key_report(model: nn.Module, state: dict[str, Tensor]) -> dict[str, list[str]]:
    """Keys missing from ``state``, unexpected in it, and present with a different shape."""
    own = model.state_dict()
    return {
        "matched": sorted(k for k in own if k in state and tuple(own[k].shape) == tuple(state[k].shape)),
        "missing": sorted(k for k in own if k not in state),
        "unexpected": sorted(k for k in state if k not in own),
        "shape_mismatch": sorted(
            f"{k}: model {tuple(own[k].shape)} vs file {tuple(state[k].shape)}"
            for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)
        ),
    }


def load_encoder_weights(model: nn.Module, path_or_state, *, strict: bool = True) -> dict[str, list[str]]:
    """Load weights into ``model``; with ``strict`` any mismatch raises a readable report."""
    state = path_or_state if isinstance(path_or_state, dict) else read_weights(path_or_state)
    report = key_report(model, state)
    bad = {k: v for k, v in report.items() if k != "matched" and v}
    if strict and bad:
        lines = [f"{k} ({len(v)}): {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}" for k, v in bad.items()]
        raise KeyMismatchError("weights do not match the model:\n  " + "\n  ".join(lines))
    if strict:
        model.load_state_dict(state, strict=True)
    else:
        model.load_state_dict({k: state[k] for k in report["matched"]}, strict=False)
    return report


class CheckpointManager:
    """Training checkpoints in a run directory: ``checkpoint-<step>.pth``, written atomically
    (:func:`atomic_write`), the newest ``keep_last`` kept. Each holds plain data (tensors,
    numbers, strings, the resolved config) and loads with ``weights_only=True``."""

    PATTERN = "checkpoint-*.pth"

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    @staticmethod
    def step_of(path: Path) -> int:
        try:
            return int(path.stem.split("-")[1])
        except (IndexError, ValueError):
            return -1

    def paths(self) -> list[Path]:
        return sorted((p for p in self.run_dir.glob(self.PATTERN) if self.step_of(p) >= 0), key=self.step_of)

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, state: dict, step: int) -> Path:
        """Write ``checkpoint-<step>.pth``, then prune: the newest ``keep_last`` checkpoints up to
        this step stay (this one always among them); checkpoints of a later step are left over from
        before a resume from an earlier checkpoint, and go, so ``--resume auto`` continues this run."""
        path = atomic_write(self.run_dir / f"checkpoint-{step:08d}.pth", lambda tmp: torch.save(state, tmp),
                            state_bytes(state))
        older = [p for p in self.paths() if self.step_of(p) < step]
        later = [p for p in self.paths() if self.step_of(p) > step]
        for old in older[: max(0, len(older) - (self.keep_last - 1))] + later:
            old.unlink(missing_ok=True)
        return path

    def latest_readable(self, cfg=None) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, and its state; unreadable newer ones are skipped with a
        warning naming them. None when the directory holds no checkpoint."""
        for path in reversed(self.paths()):
            try:
                return path, self.load(path, cfg)
            except CheckpointError as e:
                warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
        return None

    @staticmethod
    def load(path: str | Path, cfg=None) -> dict:
        """Load a checkpoint; with ``cfg``, refuse one whose architecture settings differ.
        Raises :class:`CheckpointError` naming the file when it cannot be read."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, wrong format, refused pickle: name the file, not the reader
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from e
        if not isinstance(state, dict) or "model" not in state or "step" not in state:
            raise CheckpointError(f"cannot read checkpoint {path}: not a sparkmim training checkpoint")
        if cfg is not None:
            saved = state.get("config", {})
            diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}"
                    for k in cfg.ARCHITECTURE if k in saved and saved[k] != getattr(cfg, k)]
            if diff:
                raise ValueError(f"cannot resume from {path}: the configuration changed ({'; '.join(diff)}); "
                                 f"resume with the original settings or start a new run directory")
        return state
