"""ODE samplers (Euler, Heun) from noise (t = 1) to data (t = 0) and guidance (CFG, AutoGuidance).

A *velocity function* is ``f(x, t) -> v`` with ``t`` a float tensor of shape ``[B]``. :func:`guided_velocity` builds
one from a model, class labels and a guidance setting; :func:`sample_ode` integrates it on the time grid
``t_i = shift(1 − i/steps)``, i = 0..steps (the same shift as training).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rae_generation.flow import time_shift

__all__ = ["time_grid", "euler_step", "heun_step", "sample_ode", "cfg_velocity", "guided_velocity", "in_interval"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """``steps + 1`` decreasing times from 1 to 0 (float64 for the step sizes), shifted like the training times."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return time_shift(u, shift)


def euler_step(f: VelocityFn, x: Tensor, t: float, t_next: float) -> Tensor:
    tb = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    return x + (t_next - t) * f(x, tb)


def heun_step(f: VelocityFn, x: Tensor, t: float, t_next: float) -> Tensor:
    """Second order (trapezoid with an Euler predictor); two velocity evaluations."""
    tb = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    v1 = f(x, tb)
    x_pred = x + (t_next - t) * v1
    v2 = f(x_pred, torch.full_like(tb, t_next))
    return x + (t_next - t) * 0.5 * (v1 + v2)


@torch.no_grad()
def sample_ode(f: VelocityFn, noise: Tensor, steps: int = 50, method: str = "euler", shift: float = 1.0) -> Tensor:
    """Integrate ``dx/dt = f(x, t)`` from ``x(1) = noise`` to ``t = 0``; returns ``x(0)``."""
    steps_fn = {"euler": euler_step, "heun": heun_step}
    if method not in steps_fn:
        raise ValueError(f"unknown sampler {method!r} (expected euler | heun)")
    ts = time_grid(steps, shift).tolist()
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = steps_fn[method](f, x, t, t_next)
    return x


def in_interval(t: Tensor, interval: tuple[float, float] | None) -> bool:
    """Whether guidance applies at time ``t`` (all rows share one time): ``lo <= t <= hi``; None = always."""
    if interval is None:
        return True
    lo, hi = interval
    tv = float(t.reshape(-1)[0])
    return lo <= tv <= hi


def cfg_velocity(model, x: Tensor, t: Tensor, y: Tensor, scale: float, null_class: int) -> Tensor:
    """Classifier-free guidance ``v_u + scale·(v_c − v_u)``, conditional and unconditional in one batch."""
    y_null = torch.full_like(y, null_class)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
    v_c, v_u = v.chunk(2)
    return v_u + scale * (v_c - v_u)


def guided_velocity(model, y: Tensor, cfg_scale: float = 1.0, interval: tuple[float, float] | None = None,
                    guide=None) -> VelocityFn:
    """Velocity function for class labels ``y``.

    * ``guide=None``: CFG with ``cfg_scale`` (1 = the conditional model, one pass), only inside ``interval``.
    * ``guide`` = a weaker model (smaller, or an earlier checkpoint): AutoGuidance
      ``v_guide + scale·(v_main − v_guide)``, both conditional, inside ``interval``.
    Outside the interval the conditional model is used alone.
    """
    null_class = int(model.cfg.num_classes)

    def f(x: Tensor, t: Tensor) -> Tensor:
        if cfg_scale == 1.0 or not in_interval(t, interval):
            return model(x, t, y).float()
        if guide is None:
            return cfg_velocity(model, x, t, y, cfg_scale, null_class).float()
        v_main, v_guide = model(x, t, y).float(), guide(x, t, y).float()
        return v_guide + cfg_scale * (v_main - v_guide)

    return f
