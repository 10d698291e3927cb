"""The memory a training step needs, estimated before the run starts, and the memory the device has.

The estimate runs the step's forward and backward once on the ``meta`` device (shapes only, no
arithmetic, no memory), with the model's parameters and buffers swapped for meta tensors, and
follows every tensor storage that the step creates: its size when made, freed when the last tensor
using it goes. The peak of what is alive at once is the step's activations, saved tensors and
gradients, exactly as autograd keeps them; the weights and LAMB's two moments per trained parameter
are added. Not counted: kernels' scratch space (a CPU convolution's backward, cuDNN workspaces) and
the allocator's slack, so the figure is a lower bound: a run refused on it cannot fit."""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["StepMemory", "step_memory", "available_memory", "LiveStorage", "MOST"]

MOST = 0.8  # a step that needs more than this share of the device's memory is warned about


class LiveStorage(TorchDispatchMode):
    """Counts the bytes of the tensor storages made while it is active that are still alive
    (``live``) and the most that were alive at once (``peak``)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._held: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self._held.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._held:  # a new storage (views and in-place results share one)
                    self._held.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


@dataclass
class StepMemory:
    """Bytes a training step holds: ``weights`` (parameters and buffers), ``optimizer`` (LAMB's
    two moments), and ``step``, the most held at once by the forward and backward (activations,
    what autograd saves, gradients, the batch), for ``batch`` samples."""

    weights: int
    optimizer: int
    step: int
    batch: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.step

    def for_batch(self, batch: int) -> int:
        """About the total for another batch size (the step's share taken as growing with it)."""
        return self.weights + self.optimizer + math.ceil(self.step * batch / self.batch)


def step_memory(model: nn.Module, input_shape: tuple[int, ...], batch: int,
                compute_dtype: torch.dtype | None = None) -> StepMemory:
    """The memory of one training step of the SparK ``model`` on ``batch`` inputs of ``input_shape``
    (channels first), traced on the meta device with activations in ``compute_dtype`` (bf16 or
    fp16 under autocast; default: the parameters' dtype, in which the gradients stay)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    param_dtype = trained[0].dtype if trained else torch.float32
    dtype = compute_dtype or param_dtype
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    was_training = model.training
    model.train()
    try:
        with _on_meta(model, dtype), LiveStorage() as live:
            images = torch.empty((batch, *input_shape), device="meta", dtype=dtype)
            masks = model.draw_masks(images, torch.Generator().manual_seed(0))
            model(images, masks).loss.float().backward()
    finally:
        model.train(was_training)
    size, traced = param_dtype.itemsize, dtype.itemsize
    numel = sum(p.numel() for p in trained)
    return StepMemory(weights=weights, optimizer=2 * numel * size, step=live.peak + numel * (size - traced),
                      batch=batch)


@contextlib.contextmanager
def _on_meta(model: nn.Module, dtype: torch.dtype):
    """Every parameter and buffer of ``model`` swapped, slot by slot, for a meta tensor of its shape
    (floating parameters in ``dtype``), and put back afterwards; a tensor held in several places
    (modules shared by two parents) has one stand-in."""
    stand_in: dict[int, torch.Tensor] = {}
    swapped = []
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for name, t in slots.items():
                if t is None:
                    continue
                if id(t) not in stand_in:
                    kind = dtype if isinstance(t, nn.Parameter) and t.is_floating_point() else t.dtype
                    meta = torch.empty_like(t, device="meta", dtype=kind)
                    stand_in[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
                swapped.append((slots, name, t))
                slots[name] = stand_in[id(t)]
    try:
        yield
    finally:
        for slots, name, t in swapped:
            slots[name] = t


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """Bytes a run can use on ``device`` and how that was read: a GPU's free memory, or the
    memory the operating system reports available (Linux ``MemAvailable``, else the physical
    memory); None where neither can be read."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free on {device} (of {total / 2**30:.1f} GiB)"
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available in this machine's memory"
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of this machine's memory"
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(need: StepMemory, available: tuple[int, str] | None, device: torch.device, crop: str) -> None:
    """Refuse (:class:`~sparkmim.config.ConfigError`) a step that needs more memory than
    ``available`` and warn about one that needs most of it, naming what to lower: the batch (with
    the largest that fits), the crop (``crop``, as the flags that set it), the decoder."""
    import warnings

    from ..config import ConfigError

    if available is None:
        return
    free, where = available
    parts = (f"{gib(need.step)} for the step's activations and gradients at batch {need.batch}, {gib(need.weights)} "
             f"of weights, {gib(need.optimizer)} of LAMB moments")
    if need.total <= MOST * free:
        return
    fits = max((b for b in range(need.batch - 1, 0, -1) if need.for_batch(b) <= MOST * free), default=0)
    batch = (f"--batch-size {fits} (with --accum-steps {math.ceil(need.batch / fits)} for about the same effective "
             f"batch), " if fits else "")
    lower = f"{batch}the crop ({crop}) or --decoder-width"
    if need.total > free:
        raise ConfigError(f"a training step needs at least {gib(need.total)} ({parts}), but {gib(free)} are {where}: "
                          f"lower {lower}, or use a device with more memory", ["batch_size", "decoder_width"])
    warnings.warn(f"a training step needs at least {gib(need.total)} ({parts}) of the {gib(free)} {where}; if the "
                  f"run fails for memory, lower {lower}", stacklevel=3)
