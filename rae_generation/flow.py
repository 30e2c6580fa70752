"""Flow matching on the linear path (RAE / SiT-style rectified flow), with t = 1 the noise end.

``x_t = (1 − t)·x + t·ε``, velocity target ``v = ε − x``, MSE. Training times are drawn logit-normal (or uniform)
and then pushed towards the noise end by the dimension-dependent shift ``t ↦ s·t / (1 + (s − 1)·t)`` with
``s = sqrt(N_tokens · C / base)`` (RAE: base 4096). Samplers use the same shift on their time grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["shift_factor", "time_shift", "inverse_time_shift", "sample_t", "interpolate", "velocity_target",
           "flow_loss"]


def shift_factor(num_tokens: int, channels: int, base: float = 4096.0) -> float:
    """``s = sqrt(N · C / base)``: > 1 for data of more dimensions than ``base`` (more noise), < 1 for fewer."""
    if num_tokens <= 0 or channels <= 0 or base <= 0:
        raise ValueError(f"shift_factor needs positive sizes, got N={num_tokens}, C={channels}, base={base}")
    return math.sqrt(num_tokens * channels / base)


def time_shift(t: Tensor | float, s: float) -> Tensor | float:
    """``s·t / (1 + (s − 1)·t)``: maps [0, 1] onto itself, fixes 0 and 1; s > 1 moves mass towards noise (t = 1)."""
    return s * t / (1 + (s - 1) * t)


def inverse_time_shift(u: Tensor | float, s: float) -> Tensor | float:
    """The inverse of :func:`time_shift`: ``u / (s − (s − 1)·u)``."""
    return u / (s - (s - 1) * u)


def sample_t(batch: int, *, dist: str = "logit_normal", mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
             device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """Training times ``[batch]``: ``logit_normal`` (sigmoid of N(mean, std²)) or ``uniform``, then shifted."""
    if dist == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, device=device, generator=generator))
    elif dist == "uniform":
        t = torch.rand(batch, device=device, generator=generator)
    else:
        raise ValueError(f"unknown time distribution {dist!r} (expected logit_normal | uniform)")
    return time_shift(t, shift)


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 − t)·x + t·ε`` with ``t [B]`` broadcast over the other dims."""
    tt = _bcast(t, x)
    return (1 - tt) * x + tt * noise


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    """``d x_t / dt = ε − x``."""
    return noise - x


def flow_loss(model, x: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Mean squared error between ``model(x_t, t, y)`` and the velocity target (a scalar, float32)."""
    pred = model(interpolate(x, noise, t), t, y)
    return (pred.float() - velocity_target(x, noise).float()).pow(2).mean()
