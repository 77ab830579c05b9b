"""Data-parallel training under torchrun / accelerate launch, without changing the recipes.

Both launchers set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; ``init_from_env`` joins that
process group (gloo on CPU, nccl on CUDA) and is a no-op in a plain single process. Recipes then
shard each global batch by rank, wrap the model in DistributedDataParallel, and let only rank 0
write checkpoints and results.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the launcher's process group if there is one; True when running distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
