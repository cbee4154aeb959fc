"""torch.distributed set-up from the environment, whoever launched us.

Every backend ends up here with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
in the environment (torchrun, our local launcher, SLURM via the slurm launcher, Ray Train).
A process with no such variables runs single-process, no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(use_gpu: bool | None = None) -> DistInfo:
    """Join the process group described by the environment (idempotent)."""
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", 0)
    else:
        rank = _env_int("RANK", 0)
        world = _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", 0)
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        if world > 1:
            backend = "nccl" if use_gpu else "gloo"
            if use_gpu:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(
                backend=backend, init_method="env://", rank=rank, world_size=world
            )
    if use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
