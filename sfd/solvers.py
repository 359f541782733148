"""Teacher ODE solvers for the EDM PF-ODE dx/dt = (x - D(x, t)) / t (spec §3) with the analytical first
step (AFS, spec §4).

A denoiser is any callable ``D(x, sigma) -> x0_hat``; ``sigma`` is passed as a Python float. Conditioning
(labels, SFD-v step) is bound by the caller, e.g. with ``functools.partial``. Every solver walks the given
grid and returns the list of states, one per timestamp (index 0 is the input).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
SolverFn = Callable[..., list]

# Filled by `_register`, where each solver is named once: the name configs and studies use, the paper's name
# for the tables, and its network evaluations per step (AFS removes exactly one: the first step's predictor).
SOLVERS: dict[str, SolverFn] = {}
PAPER_NAMES: dict[str, str] = {}
EVALS_PER_STEP: dict[str, int] = {}


def _register(name: str, paper_name: str, evals_per_step: int):
    def wrap(fn):
        SOLVERS[name], PAPER_NAMES[name], EVALS_PER_STEP[name] = fn, paper_name, evals_per_step
        return fn
    return wrap


def derivative(denoiser: Denoiser, x: torch.Tensor, t: float) -> torch.Tensor:
    """d(x, t) = (x - D(x, t)) / t."""
    return (x - denoiser(x, t)) / t


def afs_derivative(x: torch.Tensor, t: float) -> torch.Tensor:
    """AFS direction d0 = x / sqrt(1 + t^2): the input rescaled to unit variance taken as the noise estimate,
    since at t_max the data is negligible next to the noise (for unit-variance Gaussian data the exact
    direction t·x / (1 + t^2) differs by a factor 1 - O(1/t^2))."""
    return x / math.sqrt(1.0 + t * t)


def afs_denoised(x: torch.Tensor, t: float) -> torch.Tensor:
    """AFS in data-prediction form: D0 = x - t * d0."""
    return x - t * afs_derivative(x, t)


def _first_derivative(denoiser: Denoiser, x: torch.Tensor, t: float, use_afs: bool) -> torch.Tensor:
    return afs_derivative(x, t) if use_afs else derivative(denoiser, x, t)


@_register("euler", "DDIM", evals_per_step=1)
def euler(denoiser: Denoiser, x: torch.Tensor, ts: Sequence[float], afs: bool = False) -> list:
    """DDIM / Euler: x' = x + (t' - t) d(x, t)."""
    states = [x]
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = _first_derivative(denoiser, x, t, afs and i == 0)
        x = x + (t_next - t) * d
        states.append(x)
    return states


@_register("heun", "Heun", evals_per_step=2)
def heun(denoiser: Denoiser, x: torch.Tensor, ts: Sequence[float], afs: bool = False) -> list:
    """EDM's Heun: Euler predictor then trapezoidal corrector on every step, the last included."""
    states = [x]
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = _first_derivative(denoiser, x, t, afs and i == 0)
        x_pred = x + (t_next - t) * d
        x = x + (t_next - t) * 0.5 * (d + derivative(denoiser, x_pred, t_next))
        states.append(x)
    return states


@_register("dpm2", "DPM(2S)", evals_per_step=2)
def dpm2(denoiser: Denoiser, x: torch.Tensor, ts: Sequence[float], afs: bool = False) -> list:
    """DPM-Solver-2 ("DPM(2S)"): Euler to the geometric midpoint, then the full step with its direction."""
    states = [x]
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = _first_derivative(denoiser, x, t, afs and i == 0)
        t_mid = math.sqrt(t * t_next)
        x_mid = x + (t_mid - t) * d
        x = x + (t_next - t) * derivative(denoiser, x_mid, t_mid)
        states.append(x)
    return states


# Adams–Bashforth coefficients, newest derivative first (spec §3).
_IPNDM_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm_update(x: torch.Tensor, t: float, t_next: float, derivs: Sequence[torch.Tensor], order: int) -> torch.Tensor:
    """One Adams–Bashforth update; `derivs` newest first."""
    return x + (t_next - t) * sum(c * d for c, d in zip(_IPNDM_COEFFS[order], derivs))


@_register("ipndm", "iPNDM", evals_per_step=1)
def ipndm(denoiser: Denoiser, x: torch.Tensor, ts: Sequence[float], afs: bool = False, max_order: int = 4) -> list:
    """Improved PNDM: fixed-coefficient Adams–Bashforth of order min(max_order, step index + 1)."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"ipndm max_order must be in 1..4, got {max_order}")
    states, history = [x], []  # history: newest derivative first
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        history.insert(0, _first_derivative(denoiser, x, t, afs and i == 0))
        del history[max_order:]
        x = ipndm_update(x, t, t_next, history, min(max_order, i + 1))
        states.append(x)
    return states


def dynamic_threshold(denoised: torch.Tensor, quantile: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen-style dynamic thresholding: s = max(quantile(|D|) per sample, max_value); D <- clamp(D, -s, s)/s."""
    # torch.quantile takes float32 or float64: half precision is raised to float32, float64 is kept
    flat = denoised.abs().reshape(denoised.shape[0], -1).to(torch.promote_types(denoised.dtype, torch.float32))
    s = torch.quantile(flat, quantile, dim=1).clamp(min=max_value).to(denoised.dtype)
    s = s.reshape(-1, *([1] * (denoised.ndim - 1)))
    return torch.maximum(torch.minimum(denoised, s), -s) / s


def dpmpp_order(step: int, num_timestamps: int, max_order: int, lower_order_final: bool) -> int:
    """Order of step `step` (0-based): warm-up 1, 2, ...; with lower_order_final it falls back to 2, 1 at the
    end (spec §3)."""
    if step + 1 < max_order:
        return step + 1
    if lower_order_final:
        return min(max_order, num_timestamps - (step + 1))
    return max_order


def dpmpp_update(x: torch.Tensor, t: float, t_next: float, denoised: Sequence[torch.Tensor],
                 prev_h: Sequence[float], order: int) -> torch.Tensor:
    """One DPM-Solver++ multistep update of the given order (spec §3).

    `denoised` holds data predictions newest first (D0 at t, D-1, D-2); `prev_h` the previous lambda-steps
    newest first (h0 = lambda_t - lambda_prev, h1 the one before).
    """
    h = math.log(t / t_next)
    phi1 = t_next / t - 1.0  # expm1(-h)
    x = (t_next / t) * x - phi1 * denoised[0]
    if order == 2:
        r0 = prev_h[0] / h
        x = x - 0.5 * phi1 * (denoised[0] - denoised[1]) / r0
    elif order == 3:
        r0, r1 = prev_h[0] / h, prev_h[1] / h
        d1_0 = (denoised[0] - denoised[1]) / r0
        d1_1 = (denoised[1] - denoised[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        x = x + phi2 * d1 - phi3 * d2
    return x


@_register("dpmpp3m", "DPM++(3M)", evals_per_step=1)
def dpmpp3m(
    denoiser: Denoiser,
    x: torch.Tensor,
    ts: Sequence[float],
    afs: bool = False,
    max_order: int = 3,
    lower_order_final: bool = True,
    thresholding: bool = True,
    threshold_quantile: float = 0.995,
    threshold_max: float = 1.0,
) -> list:
    """Multistep DPM-Solver++ (data prediction) in VE form, lambda = -ln t."""
    if not 1 <= max_order <= 3:
        raise ValueError(f"dpmpp3m max_order must be in 1..3, got {max_order}")
    states = [x]
    denoised_hist: list[torch.Tensor] = []  # newest first
    h_hist: list[float] = []  # previous lambda-steps, newest first
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        D = afs_denoised(x, t) if (afs and i == 0) else denoiser(x, t)
        if thresholding:
            D = dynamic_threshold(D, threshold_quantile, threshold_max)
        denoised_hist.insert(0, D)
        del denoised_hist[max_order:]
        order = min(dpmpp_order(i, len(ts), max_order, lower_order_final), len(denoised_hist))
        x = dpmpp_update(x, t, t_next, denoised_hist, h_hist, order)
        h_hist.insert(0, math.log(t / t_next))
        del h_hist[2:]
        states.append(x)
    return states


def nfe(solver: str, num_steps: int, afs: bool) -> int:
    """Network evaluations a solver spends on a grid of `num_steps` timestamps (spec §1, §4)."""
    check_solver(solver)
    return EVALS_PER_STEP[solver] * (num_steps - 1) - int(afs)


def num_steps_for_nfe(solver: str, target_nfe: int, afs: bool) -> int:
    """Inverse of `nfe`: the number of timestamps that costs exactly `target_nfe`; error if none does."""
    check_solver(solver)
    per_step = EVALS_PER_STEP[solver]
    steps, rem = divmod(target_nfe + int(afs), per_step)
    if rem or steps < 1 or (afs and steps < 2):
        raise ValueError(f"no grid gives {solver} exactly NFE={target_nfe} with afs={afs}")
    return steps + 1


def check_solver(name: str) -> None:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")


def _as_floats(t_grid) -> list[float]:
    if isinstance(t_grid, torch.Tensor):
        return [float(t) for t in t_grid.detach().cpu().tolist()]
    return [float(t) for t in t_grid]


def solve(
    name: str,
    denoiser: Denoiser,
    x: torch.Tensor,
    t_grid,
    *,
    afs: bool = False,
    return_trajectory: bool = False,
    **opts,
):
    """Integrate the PF-ODE from t_grid[0] to t_grid[-1] with a registered solver.

    `x` is the state at t_grid[0] (noise already scaled by t_max). Returns the final state, or a tensor
    [len(t_grid), *x.shape] of every state when `return_trajectory` is set.
    """
    check_solver(name)
    ts = _as_floats(t_grid)
    if len(ts) < 2:
        raise ValueError("t_grid needs at least two timestamps")
    if afs and len(ts) < 3:
        raise ValueError("AFS needs at least two steps (three timestamps): it replaces the first one")
    states = SOLVERS[name](denoiser, x, ts, afs=afs, **opts)
    return torch.stack(states) if return_trajectory else states[-1]
