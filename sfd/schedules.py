"""Time (= sigma) schedules between t_max and t_min, index 0 = t_max (spec §2).

Every schedule returns a float64 CPU tensor of `num_steps` timestamps. Solvers read the grid as Python
floats, so keeping it on the CPU costs no device synchronisation.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {}

# time_uniform maps a VP time s in [eps, 1] to sigma; eps = 1e-3 as in the DPM-Solver family.
TIME_UNIFORM_EPS = 1e-3


def _register(name: str):
    def wrap(fn):
        SCHEDULES[name] = fn
        return fn
    return wrap


def _fractions(num_steps: int) -> torch.Tensor:
    return torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)


@_register("polynomial")
def polynomial(num_steps: int, t_min: float, t_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's schedule: uniform in t^(1/rho)."""
    a, b = t_max ** (1.0 / rho), t_min ** (1.0 / rho)
    return (a + _fractions(num_steps) * (b - a)) ** rho


@_register("logsnr")
def logsnr(num_steps: int, t_min: float, t_max: float, rho: float = 7.0) -> torch.Tensor:
    """Uniform in log t (rho is ignored)."""
    return t_max * (t_min / t_max) ** _fractions(num_steps)


@_register("time_uniform")
def time_uniform(num_steps: int, t_min: float, t_max: float, rho: float = 7.0) -> torch.Tensor:
    """Polynomial spacing in VP time s in [eps, 1] (rho = 1: uniform), mapped through the VP sigma(s).

    beta_d and beta_min are fitted so that sigma(1) = t_max and sigma(eps) = t_min exactly.
    """
    eps = TIME_UNIFORM_EPS
    log_max, log_min = math.log1p(t_max**2), math.log1p(t_min**2)
    beta_d = 2.0 * (log_max - log_min / eps) / (1.0 - eps)
    beta_min = log_max - 0.5 * beta_d
    s = (1.0 + _fractions(num_steps) * (eps ** (1.0 / rho) - 1.0)) ** rho
    return torch.sqrt(torch.expm1(0.5 * beta_d * s**2 + beta_min * s))


def validate_schedule_args(kind: str, num_steps: int, t_min: float, t_max: float) -> None:
    """Raise a ValueError naming the bad argument before any work starts."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {sorted(SCHEDULES)}")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2 (timestamps, endpoints included), got {num_steps!r}")
    if not 0 < t_min < t_max:
        raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min!r}, t_max={t_max!r}")


def get_schedule(kind: str, num_steps: int, t_min: float, t_max: float, rho: float = 7.0) -> torch.Tensor:
    """`num_steps` timestamps from t_max (index 0) down to t_min (index -1), float64 on the CPU."""
    validate_schedule_args(kind, num_steps, t_min, t_max)
    try:
        grid = SCHEDULES[kind](num_steps, t_min, t_max, rho)
    except (OverflowError, ZeroDivisionError) as exc:  # e.g. t_max ** (1 / rho) for a tiny rho
        raise ValueError(f"the {kind} grid overflows for t_min={t_min}, t_max={t_max}, rho={rho} ({exc})") from None
    if not torch.isfinite(grid).all() or not (grid[1:] < grid[:-1]).all():
        raise ValueError(f"the {kind} grid for t_min={t_min}, t_max={t_max}, rho={rho} is not finite and strictly "
                         f"decreasing: {grid.tolist()}")
    # Pin the endpoints: they are exact by construction up to rounding, and callers compare them.
    grid[0], grid[-1] = t_max, t_min
    return grid


def refine_grid(kind: str, num_steps: int, t_min: float, t_max: float, rho: float, m: int) -> torch.Tensor:
    """The teacher grid of SFD (spec §5): (m+1)(N-1)+1 points of the same family, so that the student grid
    is exactly every (m+1)-th point."""
    return get_schedule(kind, (m + 1) * (num_steps - 1) + 1, t_min, t_max, rho)
