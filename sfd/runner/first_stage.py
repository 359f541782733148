"""The first stage a second stage continues from (spec §10): which of its N the second stage distils, and the
check that the second stage's Euler teacher walks the first stage's own grid. Finding and loading the first stage
is `sfd.runner.students`' job, as for any saved student."""
from __future__ import annotations

from sfd.config import ConfigError, RunConfig
from sfd.runner.students import check_same_teacher


def first_stage_num_steps(cfg: RunConfig, info: dict) -> int:
    """The first-stage N the second stage distils: an SFD model's own N, or for SFD-v the step condition
    `second_stage.first_stage_step` (default: its main N), which must be one of the N it was trained on."""
    own = info["grid"]["num_steps"]
    asked = cfg.second_stage.first_stage_step
    if not info.get("step_condition"):
        if asked is not None:
            raise ConfigError(f"second_stage.first_stage_step: got {asked}; the first stage is a plain SFD model "
                              f"(N={own}) without a step condition, so leave it null")
        return own
    trained = info.get("num_steps_choices") or [own]
    n = own if asked is None else asked
    if n not in trained:
        raise ConfigError(f"second_stage.first_stage_step: got {n}; the SFD-v first stage was trained on N in "
                          f"{trained}")
    return n


def check_first_stage(cfg: RunConfig, info: dict) -> int:
    """The second stage's Euler teacher grid ((M+1)(N-1)+1 points) must be the first stage's own grid at the N
    it distils (see `first_stage_num_steps`); returns that N."""
    check_same_teacher("second_stage.first_stage", cfg, info)
    g = info["grid"]
    n = first_stage_num_steps(cfg, info)
    expected = (cfg.solver.m + 1) * (cfg.num_steps - 1) + 1
    mismatch = {k: (g[k], getattr(cfg.student, k)) for k in ("schedule", "t_min", "t_max", "rho")
                if g[k] != getattr(cfg.student, k)}
    if n != expected or mismatch:
        hint = ""  # a step-conditioned first stage samples at any N it was trained on
        if n != expected and info.get("step_condition") and expected in (info.get("num_steps_choices") or []):
            hint = f"; the first stage is SFD-v: set second_stage.first_stage_step={expected}"
        raise ConfigError(f"second stage: the Euler teacher grid ((solver.m+1)(N-1)+1 = {expected} points) must be "
                          f"the first stage's own grid (N={n}, {g['schedule']}, t_min={g['t_min']}, "
                          f"t_max={g['t_max']}, rho={g['rho']}); differs: {mismatch or 'N'}{hint}")
    return n
