"""torchrun / DDP environment: process-group set-up and rank helpers (one code path, any world size)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "launch_info", "barrier", "all_reduce_sum", "broadcast_object",
           "all_gather_objects", "cleanup"]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launch_info() -> DistInfo:
    """This process's rank, world size and local rank as torchrun set them (one process: 0, 1, 0)."""
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device, timeout_s: float = 300.0) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU); otherwise a
    single process. With several ranks each uses GPU ``LOCAL_RANK``. Collectives time out after
    ``timeout_s``, so a dead rank fails the run."""
    rank, world, local_rank = dataclasses.astuple(launch_info())
    use_cuda = device.type == "cuda"
    if use_cuda:
        if world > 1 or device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None, store=_restart_store(world, timeout_s),
                                rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank), device


def _restart_store(world: int, timeout_s: float) -> dist.Store | None:
    """A key space of its own for each torchrun restart.

    torchrun (``--max-restarts``) keeps one agent-hosted TCP store for all rounds of a run, so the
    keys a process group writes while connecting (peer addresses) survive from the failed round, and
    the restarted ranks would read the dead ranks' addresses and time out. Prefixing the store with
    the restart count gives every round fresh keys. ``None`` (plain ``env://``) when not under an
    agent-hosted store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"sparkmim/restart-{restart}", store)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (picklable objects; the value itself with one process)."""
    if dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (picklable objects)."""
    if dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
