"""torchrun / DDP environment: process-group set-up and rank helpers (one code path, any world size)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "barrier", "all_reduce_sum", "cleanup"]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str, timeout_s: float = 300.0) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU); otherwise a
    single process. Collectives time out after ``timeout_s``, so a dead rank fails the run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            from .config import ConfigError

            raise ConfigError(f"device {device_name} requested but CUDA is not available; use --device cpu")
        device = torch.device("cuda", local_rank if world > 1 or device_name in ("auto", "cuda") else
                              torch.device(device_name).index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None)
    return DistInfo(rank, world, local_rank), device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
