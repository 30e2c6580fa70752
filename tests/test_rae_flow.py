"""Flow matching pieces and the ODE samplers / guidance of rae_generation."""

import math

import pytest
import torch

from rae_generation.flow import (
    flow_loss,
    interpolate,
    inverse_time_shift,
    sample_t,
    shift_factor,
    time_shift,
    velocity_target,
)
from rae_generation.samplers import cfg_velocity, guided_velocity, sample_ode, time_grid


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0, math.sqrt(48)])
def test_time_shift_and_inverse(s):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    u = time_shift(t, s)
    assert u[0] == 0 and u[-1] == pytest.approx(1.0)
    assert torch.all(u[1:] > u[:-1])  # monotone
    torch.testing.assert_close(inverse_time_shift(u, s), t)
    if s > 1:
        assert torch.all(u[1:-1] > t[1:-1])  # more noise
    elif s < 1:
        assert torch.all(u[1:-1] < t[1:-1])
    else:
        torch.testing.assert_close(u, t)


def test_shift_factor_rae_values():
    assert shift_factor(256, 768) == pytest.approx(math.sqrt(48))  # RAE XL on DINOv2-B: 16x16x768 / 4096
    assert shift_factor(64, 64, base=4096) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        shift_factor(0, 768)


def test_sample_t_distribution_and_shift():
    g = torch.Generator().manual_seed(0)
    t = sample_t(20000, dist="logit_normal", generator=g)
    assert 0 < t.min() and t.max() < 1 and abs(float(t.mean()) - 0.5) < 0.01
    ts = sample_t(20000, dist="logit_normal", shift=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ts, time_shift(t, 3.0))
    assert float(ts.mean()) > 0.6
    assert abs(float(sample_t(20000, dist="uniform", generator=g).mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown time distribution"):
        sample_t(4, dist="beta")


def test_linear_path_and_velocity_target():
    x, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    torch.testing.assert_close(interpolate(x, eps, torch.zeros(3)), x)
    torch.testing.assert_close(interpolate(x, eps, torch.ones(3)), eps)
    t = torch.tensor([0.2, 0.5, 0.9])
    h = 1e-3
    fd = (interpolate(x, eps, t + h) - interpolate(x, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x, eps), atol=1e-3, rtol=1e-3)
    exact = lambda xt, tt, y: velocity_target(x, eps)  # noqa: E731 (a perfect model has zero loss)
    assert flow_loss(exact, x, None, t, eps).item() == 0


# ---------------------------------------------------------------------------------------------- samplers
MU, SIGMA = 1.5, 0.5


def gaussian_velocity(x, t):
    """Exact velocity of the linear path between N(MU, SIGMA²) data (t=0) and N(0, 1) noise (t=1)."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    mean = (1 - t) * MU
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    dvar = -2 * (1 - t) * SIGMA**2 + 2 * t
    return -MU + dvar / (2 * var) * (x - mean)


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_samplers_integrate_gaussian_flow(shift):
    """The ODE maps noise ε to MU + SIGMA·ε exactly; Euler converges at first order, Heun at second."""
    eps = torch.randn(256, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = MU + SIGMA * eps
    err = {}
    for method in ("euler", "heun"):
        for steps in (10, 40):
            x = sample_ode(gaussian_velocity, eps, steps=steps, method=method, shift=shift)
            err[method, steps] = float((x - target).abs().max())
    assert err["euler", 40] < 0.15 and err["heun", 40] < 2e-3
    assert err["heun", 10] < err["euler", 10] and err["heun", 40] < err["euler", 40]
    assert err["euler", 10] / err["euler", 40] > 3  # ~4x for first order
    assert err["heun", 10] / err["heun", 40] > 10  # ~16x for second order


def test_time_grid_endpoints():
    g = time_grid(5, shift=3.0)
    assert len(g) == 6 and g[0] == 1 and g[-1] == 0 and torch.all(g[1:] < g[:-1])
    with pytest.raises(ValueError):
        time_grid(0)


class _ToyModel(torch.nn.Module):
    """A class-dependent velocity: v = x·w[y] + t (null class = num_classes)."""

    def __init__(self, num_classes=3, dim=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cfg = type("C", (), {"num_classes": num_classes})()
        self.w = torch.randn(num_classes + 1, dim, generator=g)

    def forward(self, x, t, y):
        return x * self.w[y][:, None, :] + t[:, None, None]


def test_cfg_scale_one_equals_conditional_model():
    m = _ToyModel()
    x, t, y = torch.randn(5, 2, 4), torch.full((5,), 0.3), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(cfg_velocity(m, x, t, y, 1.0, null_class=3), m(x, t, y))
    torch.testing.assert_close(guided_velocity(m, y, cfg_scale=1.0)(x, t), m(x, t, y))
    v_c, v_u = m(x, t, y), m(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(guided_velocity(m, y, cfg_scale=4.0)(x, t), v_u + 4.0 * (v_c - v_u))


def test_guidance_interval_and_autoguidance():
    m, guide = _ToyModel(seed=0), _ToyModel(seed=1)
    x, y = torch.randn(2, 2, 4), torch.tensor([0, 2])
    f = guided_velocity(m, y, cfg_scale=3.0, interval=(0.2, 0.6))
    t_out, t_in = torch.full((2,), 0.9), torch.full((2,), 0.4)
    torch.testing.assert_close(f(x, t_out), m(x, t_out, y))  # outside: conditional only
    assert not torch.allclose(f(x, t_in), m(x, t_in, y))
    ag = guided_velocity(m, y, cfg_scale=2.0, guide=guide)
    expect = guide(x, t_in, y) + 2.0 * (m(x, t_in, y) - guide(x, t_in, y))
    torch.testing.assert_close(ag(x, t_in), expect)
