"""torchrun process groups: join one (gloo on CPUs, NCCL on GPUs), wrap a model in DDP, average logged values.

Every stage calls these through `ldmkit.train.common`; with a single process they are no-ops.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group if there is one; returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if dist.is_initialized() and dist.get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))
