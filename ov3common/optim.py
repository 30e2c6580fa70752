"""Optimiser and schedule shared by every trainer: AdamW with decay on weight matrices only, warmup + cosine."""

from __future__ import annotations

import math

import torch

__all__ = ["param_groups", "build_adamw", "warmup_cosine"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight matrices (ndim >= 2) decayed; biases, norms, scalars (logit scale) and 1-D tensors not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(model: torch.nn.Module, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0, eps: float = 1e-8,
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused kernels by default (CUDA and CPU)."""
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if fused is None:
        fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base LR over ``warmup_steps``, then cosine down to ``min_lr_ratio`` × base."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
