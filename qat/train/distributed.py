"""DistributedDataParallel plumbing for runs launched by `torchrun` (single process otherwise).

`torchrun --nproc_per_node=N train.py ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` then
initialises the process group (nccl on CUDA, gloo on CPU) and picks this rank's device. Training
data is sharded by DistributedSampler; evaluation data by `rank::world_size` without padding, so
metric sums all-reduced over ranks are exactly the single-process ones. Rank 0 logs and checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto` -> cuda:<local_rank> when CUDA is available, else cpu; or the device named."""
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} but CUDA is not available; use device=auto or cpu")
    return device


def setup(requested_device: str = "auto") -> DistributedContext:
    """Initialise the process group when launched by torchrun; a 1-process context otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=pick_device(requested_device, 0))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, device)


def teardown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op for one process)."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()

