"""Teacher gap: how far a few-step sample lands from the teacher's own accurate solution of the same noise.

Per-sample RMSE between the sample and a high-NFE reference solve from the same seed (same class, same
guidance, same end time t_min). It needs no feature network and has far less variance than an FD on a
few hundred samples, so small studies can optimise it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from sfd.sampling import GridSpec, generate
from sfd.solvers import num_steps_for_nfe

GAP_SOLVER = "dpmpp3m"
GAP_NFE = 50
# The reference is the plain PF-ODE solution: dynamic thresholding rescales whole images whenever a
# prediction overshoots [-1, 1] (every step, on saturated data such as the digits), which is a change of the
# ODE, not an accuracy aid, at high NFE.
GAP_SOLVER_OPTS = {"dpmpp3m": {"thresholding": False}}


def per_sample_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.float() - b.float()) ** 2).reshape(a.shape[0], -1).mean(1).sqrt()


def reference_grid(grid: GridSpec, solver: str = GAP_SOLVER, nfe: int = GAP_NFE) -> GridSpec:
    """The reference grid: the sampler's schedule and endpoints, refined to `nfe` evaluations, no AFS."""
    return dataclasses.replace(grid, num_steps=num_steps_for_nfe(solver, nfe, afs=False), afs=False)


def teacher_reference(net: Callable, grid: GridSpec, seeds: Sequence[int], shape, *, solver: str = GAP_SOLVER,
                      nfe: int = GAP_NFE, **generate_kwargs) -> torch.Tensor:
    """The teacher's high-NFE solution for `seeds` (noise, classes and guidance as `generate` draws them)."""
    generate_kwargs.setdefault("solver_opts", GAP_SOLVER_OPTS.get(solver))
    samples, _ = generate(net, reference_grid(grid, solver, nfe), seeds, shape, solver=solver, **generate_kwargs)
    return samples
