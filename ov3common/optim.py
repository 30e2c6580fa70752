"""Optimiser and schedules shared by every trainer: AdamW with decay on weight matrices only; warmup + cosine (one,
or one per training stage), and constant-then-linear decay (RAE)."""

from __future__ import annotations

import math

import torch

__all__ = ["param_groups", "build_adamw", "clip_grad_norm", "warmup_cosine", "staged_warmup_cosine", "constant_then_linear"]


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


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm)``, bitwise, without its pass over the gradients when
    that pass would multiply them by 1: torch scales every gradient by ``min(max_norm / (norm + 1e-6), 1)`` even
    when the minimum is 1 (on the development CPU, DiT-DH-S's 196M gradients: ~40 ms a step). Returns the total
    norm as a plain tensor (FSDP2: the full norm, not the DTensor). The check reads the norm on the host; the
    trainers' non-finite guard reads it right after anyway, so no new synchronisation point."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not bool(max_norm / (full + 1e-6) >= 1.0):  # NaN / inf norms go through torch's clip, as before
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return full


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


def staged_warmup_cosine(optimizer: torch.optim.Optimizer, stages: list[tuple[int, float, int, float]]
                         ) -> torch.optim.lr_scheduler.LambdaLR:
    """One warmup + cosine per stage, back to back: ``stages`` = ``[(steps, lr_scale, warmup_steps, min_lr_ratio)]``;
    stage i's LR rises from 0 to ``lr_scale`` × the base LR over its own warmup and decays by cosine to
    ``min_lr_ratio`` × that peak at its last step (OpenVision runs the high-resolution stage as a fine-tune with its
    own warmup and a lower peak LR). After the last stage the last stage's floor is kept."""
    bounds, start = [], 0
    for steps, scale, warmup, floor in stages:
        bounds.append((start, int(steps), float(scale), max(0, int(warmup)), float(floor)))
        start += int(steps)

    def factor(step: int) -> float:
        begin, steps, scale, warmup, floor = next((b for b in bounds if step < b[0] + b[1]), bounds[-1])
        local = min(step - begin, steps - 1)
        if warmup and local < warmup:
            return scale * (local + 1) / warmup
        progress = min(1.0, (local - warmup) / max(1, steps - 1 - warmup))
        return scale * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant_then_linear(optimizer: torch.optim.Optimizer, constant_steps: int, decay_end_step: int,
                         final_ratio: float, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """RAE's ``linear`` schedule: optional linear warmup from 0 over ``warmup_steps`` (RAE: ``warmup_from_zero``,
    off in its configs), the base LR until ``constant_steps``, then linear decay to ``final_ratio`` × base at
    ``decay_end_step``, constant after."""
    constant_steps, decay_end_step = max(0, int(constant_steps)), max(int(decay_end_step), int(constant_steps))

    def factor(step: int) -> float:
        if step < constant_steps:
            return (step + 1) / warmup_steps if warmup_steps and step < warmup_steps else 1.0
        if step >= decay_end_step:
            return final_ratio
        return 1.0 - (1.0 - final_ratio) * (step - constant_steps) / max(1, decay_end_step - constant_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
