"""Saving and loading encoder weights with the original model's keys."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["save_encoder_weights", "load_encoder_weights", "KeyMismatchError", "key_report"]


class KeyMismatchError(ValueError):
    """Weights whose keys or shapes do not match the target model."""


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = _plain(model.state_dict())
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp))
    else:
        torch.save(state, tmp)
    tmp.replace(path)
    return path


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
    (temporary file, flush, fsync, rename), the newest ``keep_last`` kept. Each holds plain data
    (tensors, numbers, strings, the resolved config) and loads with ``weights_only=True``."""

    PATTERN = "checkpoint-*.pth"

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    def paths(self) -> list[Path]:
        def step_of(p: Path) -> int:
            try:
                return int(p.stem.split("-")[1])
            except (IndexError, ValueError):
                return -1

        return sorted((p for p in self.run_dir.glob(self.PATTERN) if step_of(p) >= 0), key=step_of)

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, state: dict, step: int) -> Path:
        import os

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / f"checkpoint-{step:08d}.pth"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        for old in self.paths()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | Path, cfg=None) -> dict:
        """Load a checkpoint; with ``cfg``, refuse one whose architecture settings differ."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if cfg is not None:
            saved = state.get("config", {})
            diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}"
                    for k in cfg.ARCHITECTURE if k in saved and saved[k] != getattr(cfg, k)]
            if diff:
                raise ValueError(f"cannot resume from {path}: the configuration changed ({'; '.join(diff)}); "
                                 f"resume with the original settings or start a new run directory")
        return state
