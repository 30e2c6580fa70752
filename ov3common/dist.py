"""Distributed setup: one init for torchrun (gloo on CPU, nccl on CUDA), rank helpers, seeding, model wrapping."""

from __future__ import annotations

import faulthandler
import hashlib
import os
import random
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.nn.functional import all_gather
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = [
    "DistInfo",
    "init_distributed",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "cleanup",
    "seed_all",
    "step_seed",
    "all_gather_with_grad",
    "all_reduce_mean",
    "wrap_model",
    "unwrap_model",
]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single process otherwise. A stuck
    process prints the Python stack of every thread to stderr on ``kill -USR1 <pid>`` (faulthandler)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if hasattr(signal, "SIGUSR1"):
        try:  # `kill -USR1 <pid>`: every thread's stack to the process's stderr (fd 2)
            faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
        except (AttributeError, ValueError, OSError, RuntimeError):  # no usable fd 2 (e.g. a notebook kernel): no dumps
            pass
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, is_main=rank == 0)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed that is a pure function of (seed, step, rank): call ``torch.manual_seed(step_seed(...))`` at the top of
    every training step and all randomness of the step survives a resume exactly."""
    h = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to the rank that owns each slice, summed
    over the ranks' losses (with DDP's gradient averaging this is the gradient of the mean local loss, as in CLIP)."""
    if get_world_size() == 1:
        return x

    return torch.cat(all_gather(x), dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / get_world_size()


def wrap_model(model: torch.nn.Module, strategy: str, info: DistInfo, **kwargs) -> torch.nn.Module:
    """``"none"`` (as is), ``"ddp"`` (DistributedDataParallel) or ``"fsdp2"`` (``fully_shard`` on every block listed
    by ``model.fsdp_units()`` when present, then on the root)."""
    model = model.to(info.device)
    if strategy == "none" or not info.distributed:
        return model
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids, **kwargs)
    if strategy == "fsdp2":
        units = model.fsdp_units() if hasattr(model, "fsdp_units") else []
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r} (expected none | ddp | fsdp2)")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place, so it is returned as is)."""
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
