"""Time (= sigma) schedules between t_max and t_min, index 0 = t_max (spec §2).

Every schedule returns a float64 CPU tensor of `num_steps` timestamps. Solvers read the grid as Python
floats, so keeping it on the CPU costs no device synchronisation.

`discrete` (the reference's schedule for LDM / Stable Diffusion teachers) is spaced in the model time T of a
teacher trained on discrete noise levels; those levels come as a `DiscreteVP` (default: Stable Diffusion
v1.5's), which also gives such a teacher its sigma <-> timestep conversion.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {}

# time_uniform maps a VP time s in [eps, 1] to sigma; eps = 1e-3 as in the DPM-Solver family.
TIME_UNIFORM_EPS = 1e-3


# The smallest model time of a discrete-time teacher (DPM-Solver's and the reference's epsilon_t): sigma_min = sigma(T=1e-3).
DISCRETE_EPS_T = 1e-3


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through the keypoints (xp ascending, fp); beyond the ends the outermost segments
    are extended (DPM-Solver's `interpolate_fn` does the same)."""
    xp, fp = xp.to(x.device), fp.to(x.device)  # the tables live on the CPU; x may be on the GPU
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


@dataclass(frozen=True)
class DiscreteVP:
    """The noise levels of a teacher trained on M discrete timesteps (DDPM / LDM / Stable Diffusion), as
    DPM-Solver's `NoiseScheduleVP('discrete')` reads them: level k (the UNet's timestep k = 0..M-1) sits at
    model time T_k = (k+1)/M with log alpha_k = ½·log(alphas_cumprod[k]), and log alpha is piecewise linear in
    T between the levels. In EDM's VE form sigma(T) = sqrt(1/alpha(T)² - 1); the UNet's (fractional) timestep
    for a sigma is M·T(sigma) - 1, so at sigma = sigma(T_k) it is exactly k. Compared and hashed by value."""

    alphas_cumprod: tuple[float, ...]

    @classmethod
    def from_betas(cls, betas) -> "DiscreteVP":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(tuple(torch.cumprod(1.0 - betas, 0).tolist()))

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012,
                      num_levels: int = 1000) -> "DiscreteVP":
        """LDM's / diffusers' `scaled_linear` betas: linear in sqrt(beta). The defaults are Stable Diffusion
        v1.x's (its scheduler config: beta_start 0.00085, beta_end 0.012, 1000 train timesteps)."""
        return cls.from_betas(torch.linspace(beta_start**0.5, beta_end**0.5, num_levels, dtype=torch.float64) ** 2)

    @property
    def num_levels(self) -> int:
        return len(self.alphas_cumprod)

    @functools.cached_property
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_k ascending, log alpha_k descending), float64."""
        times = torch.arange(1, self.num_levels + 1, dtype=torch.float64) / self.num_levels
        return times, 0.5 * torch.tensor(self.alphas_cumprod, dtype=torch.float64).log()

    def sigma(self, t) -> torch.Tensor:
        """sigma(T), float64, for a model time T (a number or a tensor)."""
        times, log_alpha = self._tables
        la = _interpolate(torch.as_tensor(t, dtype=torch.float64), times, log_alpha)
        return torch.expm1(-2.0 * la).sqrt()

    def model_time(self, sigma) -> torch.Tensor:
        """T(sigma), float64: the inverse of `sigma`, interpolated in log alpha = -½·log(1 + sigma²)."""
        times, log_alpha = self._tables
        la = -0.5 * torch.log1p(torch.as_tensor(sigma, dtype=torch.float64) ** 2)
        return _interpolate(la, log_alpha.flip(0), times.flip(0))

    def timestep(self, sigma) -> torch.Tensor:
        """The UNet's timestep c = M·T(sigma) - 1 (fractional between levels), float64."""
        return self.num_levels * self.model_time(sigma) - 1.0

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(DISCRETE_EPS_T))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1.0))


SD15_NOISE_LEVELS = DiscreteVP.scaled_linear()
# How far (relative) the discrete schedule's own start sigma(T(t_max)^rho) may lie from t_max: t_max rounded to
# 4 decimals, as configs give sigma_max, moves it by up to 2e-5 at rho = 7.
DISCRETE_START_RTOL = 1e-4


def _register(name: str):
    def wrap(fn):
        SCHEDULES[name] = fn
        return fn
    return wrap


def _fractions(num_steps: int) -> torch.Tensor:
    return torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)


@_register("polynomial")
def polynomial(num_steps: int, t_min: float, t_max: float, rho: float = 7.0,
               noise_levels: DiscreteVP | None = None) -> torch.Tensor:
    """EDM's schedule: uniform in t^(1/rho)."""
    a, b = t_max ** (1.0 / rho), t_min ** (1.0 / rho)
    return (a + _fractions(num_steps) * (b - a)) ** rho


@_register("logsnr")
def logsnr(num_steps: int, t_min: float, t_max: float, rho: float = 7.0,
           noise_levels: DiscreteVP | None = None) -> torch.Tensor:
    """Uniform in log t (rho is ignored)."""
    return t_max * (t_min / t_max) ** _fractions(num_steps)


@_register("time_uniform")
def time_uniform(num_steps: int, t_min: float, t_max: float, rho: float = 7.0,
                 noise_levels: DiscreteVP | None = None) -> torch.Tensor:
    """Polynomial spacing in VP time s in [eps, 1] (rho = 1: uniform), mapped through the VP sigma(s).

    beta_d and beta_min are fitted so that sigma(1) = t_max and sigma(eps) = t_min exactly.
    """
    eps = TIME_UNIFORM_EPS
    log_max, log_min = math.log1p(t_max**2), math.log1p(t_min**2)
    beta_d = 2.0 * (log_max - log_min / eps) / (1.0 - eps)
    beta_min = log_max - 0.5 * beta_d
    s = (1.0 + _fractions(num_steps) * (eps ** (1.0 / rho) - 1.0)) ** rho
    return torch.sqrt(torch.expm1(0.5 * beta_d * s**2 + beta_min * s))


@_register("discrete")
def discrete(num_steps: int, t_min: float, t_max: float, rho: float = 7.0,
             noise_levels: DiscreteVP | None = None) -> torch.Tensor:
    """The reference's schedule for discrete-time teachers, spaced in model time T:
    T_i = (T_max + i/(N-1)·(T_min^(1/rho) - T_max))^rho with T_min = T(t_min), T_max = T(t_max), t_i = sigma(T_i).

    As the reference writes it, T_max is not raised to 1/rho, so the grid starts at sigma(T_max^rho): that is
    t_max only where T_max = 1 (t_max = sigma_max) or rho = 1 (uniform in T). A start further than 1e-4
    (relative) from t_max is refused, since samples are drawn at t_max; a nearer one is t_max given rounded
    (Stable Diffusion's 14.6146 for sigma_max = 14.61464) and the grid starts at t_max. With T_max = 1 the points
    are uniform in T^(1/rho): rho > 1 crowds them towards t_min like EDM's polynomial schedule does in sigma.
    """
    levels = noise_levels or SD15_NOISE_LEVELS
    t_lo, t_hi = float(levels.model_time(t_min)), float(levels.model_time(t_max))
    if t_lo <= 0:
        raise ValueError(f"t_min={t_min} lies below the teacher's noise levels (model time T(t_min)={t_lo:.3g} <= 0 "
                         f"by linear extrapolation; its lowest level is sigma={levels.sigma_min:.4g})")
    start = float(levels.sigma(t_hi**rho))
    if abs(start - t_max) > DISCRETE_START_RTOL * t_max:
        raise ValueError(f"the discrete schedule with rho={rho} starts at sigma(T(t_max)^rho) = {start:.6g}, not at "
                         f"t_max={t_max} (the reference's formula does not raise T_max to 1/rho); use rho=1, or "
                         f"t_max = the teacher's sigma_max = {levels.sigma_max:.6g}")
    times = (t_hi + _fractions(num_steps) * (t_lo ** (1.0 / rho) - t_hi)) ** rho
    return levels.sigma(times)


def validate_schedule_args(kind: str, num_steps: int, t_min: float, t_max: float) -> None:
    """Raise a ValueError naming the bad argument before any work starts."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {sorted(SCHEDULES)}")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2 (timestamps, endpoints included), got {num_steps!r}")
    if not 0 < t_min < t_max:
        raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min!r}, t_max={t_max!r}")


def get_schedule(kind: str, num_steps: int, t_min: float, t_max: float, rho: float = 7.0,
                 noise_levels: DiscreteVP | None = None) -> torch.Tensor:
    """`num_steps` timestamps from t_max (index 0) down to t_min (index -1), float64 on the CPU.
    `noise_levels`: the teacher's discrete noise levels, read by `discrete` only (default: Stable Diffusion's)."""
    validate_schedule_args(kind, num_steps, t_min, t_max)
    try:
        grid = SCHEDULES[kind](num_steps, t_min, t_max, rho, noise_levels=noise_levels)
    except (OverflowError, ZeroDivisionError) as exc:  # e.g. t_max ** (1 / rho) for a tiny rho
        raise ValueError(f"the {kind} grid overflows for t_min={t_min}, t_max={t_max}, rho={rho} ({exc})") from None
    if not torch.isfinite(grid).all() or not (grid[1:] < grid[:-1]).all():
        raise ValueError(f"the {kind} grid for t_min={t_min}, t_max={t_max}, rho={rho} is not finite and strictly "
                         f"decreasing: {grid.tolist()}")
    # Pin the endpoints: they are exact by construction up to rounding, and callers compare them.
    grid[0], grid[-1] = t_max, t_min
    return grid


def refine_grid(kind: str, num_steps: int, t_min: float, t_max: float, rho: float, m: int,
                noise_levels: DiscreteVP | None = None) -> torch.Tensor:
    """The teacher grid of SFD (spec §5): (m+1)(N-1)+1 points of the same family, so that the student grid
    is exactly every (m+1)-th point."""
    return get_schedule(kind, (m + 1) * (num_steps - 1) + 1, t_min, t_max, rho, noise_levels)
