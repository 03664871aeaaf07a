"""Data-parallel training with PyTorch's own engine (torch.distributed + DDP), or none.

Launched by `torchrun`, every process finds RANK, LOCAL_RANK and WORLD_SIZE in its
environment; we then join the process group (NCCL with one GPU per local rank, gloo on CPU).
Launched plainly (`python -m ...`), there is one process and nothing here does any work, so
the same training loop serves both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.cli import UserError
from common.runtime import pick_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, samples and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(device=pick_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, device)


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """The average of a scalar over all ranks (itself when not distributed)."""
    if not d.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / d.world_size


def max_across(d: Dist, values: list[float]) -> list[float]:
    """The elementwise maximum of a few floats over all ranks (the values when not distributed).

    One collective for several decisions: rank 0 sends the clock, every rank its stop flag.
    """
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
