"""What a run reports: metric lines (JSON and TensorBoard), the sums behind them, the plot of
them (``metrics.png``), the progress bar."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from ..weights import atomic_write
from .loop import StepStats

__all__ = ["Metrics", "Window", "plot_metrics", "metrics_figure"]


PLOTTED = (("loss", "loss (masked patches)"), ("grad_norm", "gradient norm (before clipping)"), ("lr", "learning rate"))
PLOT_SHARE = 0.05  # drawing metrics.png takes at most this share of the run's time (but the last one)


def plot_metrics(records: list[dict], path: Path) -> Path:
    """``metrics.png`` (:func:`metrics_figure`), written atomically with matplotlib's headless backend."""
    fig = metrics_figure(records)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def metrics_figure(records: list[dict]):
    """Loss, gradient norm and lr of the metric lines against steps (bottom axis) and images seen
    (top axis). A short run stays legible: whole steps on the axis, a marker at each of a few
    points, and a single point drawn in the middle of an axis a step wide on each side."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = Figure(figsize=(12, 3.4), dpi=100)
    axes = fig.subplots(1, len(PLOTTED))
    steps = [r["step"] for r in records]
    per_step = records[-1]["images_seen"] / max(records[-1]["step"], 1)  # images per optimiser step
    for ax, (key, title) in zip(axes, PLOTTED):
        points = [(x, r[key]) for x, r in zip(steps, records) if r.get(key) is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o" if len(points) < 30 else None,
                markersize=4, lw=1.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len({x for x, _ in points}) == 1:  # one step logged: room around it
            ax.set_xlim(points[0][0] - 1, points[0][0] + 1)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))  # no offset text under the top axis
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda n: n / per_step))
        top.set_xlabel("images seen", fontsize=8)
        top.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.15, top=0.76, wspace=0.28)
    return fig


def _records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return records


class Metrics:
    """``metrics.jsonl`` in the run directory (one JSON object a line), the same scalars in
    TensorBoard when it is installed and asked for, ``metrics.png`` (:func:`plot_metrics`, redrawn
    at a metric line unless drawing would take more than :data:`PLOT_SHARE` of the time since
    the last drawing, and at the end), and a progress bar once opened."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        path = run_dir / "metrics.jsonl"
        self.records = _records(path)  # the lines of the run so far (a resumed run plots them too)
        self.plot_path, self.plotted, self.plot_seconds = run_dir / "metrics.png", time.perf_counter(), 0.0
        self.file = open(path, "a", buffering=1)
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
        self.records.append(record)
        if time.perf_counter() - self.plotted >= self.plot_seconds / PLOT_SHARE:
            self.plot()
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

    def plot(self) -> None:
        """Redraw ``metrics.png`` (nothing without matplotlib, which is then named once)."""
        if self.plot_path is None or not self.records:
            return
        started = time.perf_counter()
        try:
            plot_metrics(self.records, self.plot_path)
        except ImportError:
            warnings.warn("matplotlib is not installed: no metrics.png (pip install matplotlib)", stacklevel=2)
            self.plot_path = None
        self.plotted = time.perf_counter()
        self.plot_seconds = self.plotted - started

    def close(self) -> None:
        if self.file.closed:
            return
        self.plot()
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Window:
    """Sums over the optimiser steps since the last metric line, kept on the device so a step needs
    no host read: losses and micro-batches, pre-clip gradient norms and the steps they count (an
    fp16 step whose gradients overflowed is skipped by the scaler and left out), images, time.

    The sums behind the metrics go into checkpoints (:meth:`state_dict`), so a run resumed
    mid-window logs the lines an uninterrupted run logs; images and time restart with the
    process (``img_per_s`` measures this process)."""

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
        self.steps, self.data_seconds = 0, 0.0

    def add(self, stats: StepStats, images: int, data_seconds: float = 0.0) -> None:
        self.steps += 1
        self.data_seconds += data_seconds
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

    def state_dict(self) -> dict:
        """The sums behind the next metric line (plain data, for a checkpoint)."""
        return {"loss_sum": self.loss_sum.detach().cpu().clone(), "norm_sum": self.norm_sum.detach().cpu().clone(),
                "norm_steps": self.norm_steps.detach().cpu().clone(), "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict, losses: bool = True) -> None:
        """Take the sums of a checkpoint; without ``losses`` only the gradient-norm sums (the loss
        sums of several ranks are kept by one of them)."""
        self.norm_sum.copy_(state["norm_sum"])
        self.norm_steps.copy_(state["norm_steps"])
        if losses:
            self.loss_sum.copy_(state["loss_sum"])
            self.micro_batches = int(state["micro_batches"])
