"""Numerical fault handling shared by the trainers: a NaN/Inf loss skips the step (logged); K consecutive bad steps
stop the run with :class:`TrainingDiverged`, leaving the last good checkpoint as the one to resume from."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ov3common.dist import get_world_size
from ov3common.log import get_logger

__all__ = ["NonFiniteGuard", "TrainingDiverged"]

log = get_logger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised after ``max_consecutive`` non-finite steps in a row."""


class NonFiniteGuard:
    """``if guard.bad(loss, step): optimizer.zero_grad(); continue`` — skip the update of a non-finite step.

    ``loss`` may be a tensor (checked across ranks: if any rank is bad, every rank skips, keeping DDP in step) or a
    float. Checking gradients too (``grads_of=model``) catches a finite loss with an infinite gradient."""

    def __init__(self, max_consecutive: int = 5):
        self.max_consecutive = max(1, int(max_consecutive))
        self.consecutive = 0
        self.skipped_total = 0

    def bad(self, loss: torch.Tensor | float, step: int, grads_of: torch.nn.Module | None = None) -> bool:
        if isinstance(loss, torch.Tensor):
            flag = (~torch.isfinite(loss.detach().float())).any().float().reshape(1)
            if grads_of is not None:
                # FSDP2 gradients are DTensors: each rank checks its own shard (the flag is all-reduced below)
                grads = [g.to_local() if hasattr(g, "to_local") else g
                         for g in (p.grad for p in grads_of.parameters()) if g is not None]
                if grads:
                    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                    flag = torch.maximum(flag, (~torch.isfinite(norm)).float().reshape(1))

            if get_world_size() > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            is_bad = bool(flag.item() > 0)
            value = float(loss.detach().float().mean()) if loss.numel() else float("nan")
        else:
            is_bad, value = not math.isfinite(loss), float(loss)
        if not is_bad:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.skipped_total += 1
        log.warning("step %d: non-finite loss/gradient (%s); update skipped (%d in a row, %d in total)",
                    step, value, self.consecutive, self.skipped_total)
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"{self.consecutive} consecutive non-finite steps (last at step {step}); stopping. The last good "
                f"checkpoint is kept: lower the learning rate or inspect the data, then resume.")
        return True

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, d: dict) -> None:
        self.consecutive, self.skipped_total = int(d["consecutive"]), int(d["skipped_total"])
