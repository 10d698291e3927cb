"""The training step captured once and replayed: forward, backward, the one clip and the LAMB
step of every micro-batch as one CUDA graph launch.

A step's shapes are static (every sample keeps the same number of visible patches) and it reads
no value on the host (the optimiser keeps its step count, lr and weight decay on the device), so
after a few eager steps, which also create the optimiser state, the step can be recorded once
with ``torch.cuda.graph`` and replayed: each replay copies the step's images and masks into
fixed input buffers, then launches the whole graph, which removes the Python dispatch and the
thousands of kernel launches of an eager step. The masks are drawn on the device, outside the
graph, by the caller (the same masks as an eager step's).

:class:`CapturedStep` keeps the step in that form. On a device without CUDA graphs (the CPU, in
the tests), ``replay`` runs the same static function eagerly, so what the graph would record (the
buffers, the masks rebuilt from the mask buffer, the in-place optimiser state) is checked to
give the eager step's weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..masking import MaskPyramid
from .loop import StepStats, train_step

__all__ = ["CapturedStep", "CAPTURE_WARMUP_STEPS"]

CAPTURE_WARMUP_STEPS = 3
"""Eager steps before the capture (they build the optimiser state and let cuDNN pick kernels)."""


class CapturedStep:
    """A callable with :func:`~sparkmim.train.loop.train_step`'s meaning, recorded once and replayed.

    The first :data:`CAPTURE_WARMUP_STEPS` calls run :func:`train_step` eagerly (on a side stream
    on CUDA, as graph capture requires); the next call records the step into static buffers and
    every call from then on copies its inputs into them and replays it. The statistics returned
    are copies, so they stay valid after the next replay."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                 accum_steps: int = 1, clip_grad: float = 5.0,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 warmup_steps: int = CAPTURE_WARMUP_STEPS):
        if scaler.is_enabled():
            raise ValueError("a captured step cannot use fp16 loss scaling (the scaler reads a value on the host "
                             "each step): use bf16 or fp32")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.accum_steps, self.clip_grad, self.autocast = accum_steps, clip_grad, autocast
        self.warmup_steps, self.calls = warmup_steps, 0
        self.graph = None
        self.images: list[Tensor] = []
        self.visible: list[Tensor] = []
        self.keep: int | None = None
        self.outputs: StepStats | None = None

    def __call__(self, micro_batches: Iterable[tuple[Tensor, MaskPyramid]]) -> StepStats:
        batches = list(micro_batches)
        self.calls += 1
        if self.calls <= self.warmup_steps:
            with self._side_stream(batches[0][0]):
                return train_step(self.model, self.optimizer, self.scaler, batches, accum_steps=self.accum_steps,
                                  clip_grad=self.clip_grad, autocast=self.autocast)
        if self.outputs is None:
            self._record(batches)
        else:
            self._load(batches)
            self.replay()
        o = self.outputs
        return StepStats(o.loss_sum.clone(), o.micro_batches, o.grad_norm.clone(), o.nonfinite.clone())

    def _load(self, batches) -> None:
        if len(batches) != len(self.images):
            raise ValueError(f"a step takes {len(self.images)} micro-batches, got {len(batches)}")
        for (images, masks), image_buffer, mask_buffer in zip(batches, self.images, self.visible):
            if images.shape != image_buffer.shape or masks.keep != self.keep:
                raise ValueError("a captured step needs the same batch shape and visible-patch count every step")
            image_buffer.copy_(images, non_blocking=True)
            mask_buffer.copy_(masks.visible, non_blocking=True)

    def _static_step(self) -> StepStats:
        """The step on the buffers: what the graph records."""
        batches = [(images, MaskPyramid(visible, keep=self.keep)) for images, visible in zip(self.images, self.visible)]
        return train_step(self.model, self.optimizer, self.scaler, batches, accum_steps=self.accum_steps,
                          clip_grad=self.clip_grad, autocast=self.autocast)

    def _record(self, batches) -> None:
        self.images = [images.clone() for images, _ in batches]
        self.visible = [masks.visible.clone() for _, masks in batches]
        self.keep = batches[0][1].keep
        if self.keep is None:
            raise ValueError("a captured step needs the same number of visible patches in every sample")
        self.optimizer.zero_grad(set_to_none=True)
        device = self.images[0].device
        if device.type == "cuda":
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self._static_step()
            self.graph.replay()  # recording ran nothing: this is the step itself
        else:
            self.outputs = self._static_step()

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.outputs = self._static_step()

    @staticmethod
    def _side_stream(images: Tensor):
        """Eager steps before a capture run on a side stream (CUDA's requirement); elsewhere, as is."""
        if images.device.type != "cuda":
            return contextlib.nullcontext()
        return _SideStream(images.device)


class _SideStream:
    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)

    def __enter__(self):
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self.context = torch.cuda.stream(self.stream)
        self.context.__enter__()

    def __exit__(self, *exc):
        self.context.__exit__(*exc)
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
