"""What a run reports: metric lines (JSON and TensorBoard), the sums behind them, the progress bar."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from ..weights import atomic_write
from .loop import StepStats

__all__ = ["Metrics", "Window"]


class Metrics:
    """``metrics.jsonl`` in the run directory (one JSON object a line), the same scalars in
    TensorBoard when it is installed and asked for, and a progress bar once opened."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed; metrics go to metrics.jsonl only", stacklevel=2)
        self.bar = None

    def open_bar(self, total_steps: int, done_steps: int) -> None:
        """Show a progress bar (loss, gradient norm, lr, img/s and the ETA) from here on."""
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True, mininterval=1.0)

    @staticmethod
    def truncate(run_dir: Path, step: int) -> None:
        """Drop the lines of steps after ``step`` (logged before a crash, and logged again after
        the resume from ``step``), so every step appears once."""
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            return

        def kept(line: str) -> bool:
            try:
                return json.loads(line).get("step", 0) <= step
            except ValueError:  # a line cut short by the crash
                return False

        keep = [line for line in path.read_text().splitlines(keepends=True) if kept(line)]
        atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"pretrain/{k}", v, record["step"])
        if self.bar is not None:
            grad = "-" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", grad_norm=grad, lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['img_per_s']:.1f}", refresh=False)

    def stepped(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, grid, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Window:
    """Sums over the optimiser steps since the last metric line, kept on the device so a step needs
    no host read: losses and micro-batches, pre-clip gradient norms and the steps they count (an
    fp16 step whose gradients overflowed is skipped by the scaler and left out), images, time."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.norm_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.norm_steps = torch.zeros((), device=device, dtype=torch.float64)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.norm_sum.zero_()
        self.norm_steps.zero_()
        self.micro_batches, self.images, self.started = 0, 0, time.perf_counter()

    def add(self, stats: StepStats, images: int) -> None:
        self.loss_sum += stats.loss_sum
        self.micro_batches += stats.micro_batches
        finite = torch.isfinite(stats.grad_norm)
        self.norm_sum += torch.where(finite, stats.grad_norm, 0.0)
        self.norm_steps += finite
        self.images += images

    def grad_norm(self) -> float | None:
        """The mean pre-clip gradient norm of the window's steps (a host read)."""
        steps = float(self.norm_steps)
        return float(self.norm_sum) / steps if steps else None
