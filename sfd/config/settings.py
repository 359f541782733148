"""The adapter from a run config to the core: the student's `GridSpec` and the distillation loop's settings."""
from __future__ import annotations

from sfd.config.schema import TRAINING_ALGORITHMS, ConfigError, RunConfig
from sfd.distill import DistillSettings
from sfd.sampling import GridSpec


def grid_spec(cfg: RunConfig, num_steps: int | None = None) -> GridSpec:
    """The student's sampling grid (N = `num_steps`, default the config's own)."""
    s = cfg.student
    return GridSpec(num_steps=num_steps or cfg.num_steps, afs=s.afs, schedule=s.schedule, t_min=s.t_min,
                    t_max=s.t_max, rho=s.rho)


def to_settings(cfg: RunConfig, *, num_classes: int = 0, teacher_afs: bool | None = None,
                teacher_step: int | None = None) -> DistillSettings:
    """The core's DistillSettings for a training algorithm (sfd-v and second-stage map onto the same loop:
    a list of N choices with a step-conditioned student, or an Euler teacher with the first stage's AFS)."""
    if cfg.algorithm not in TRAINING_ALGORITHMS:
        raise ConfigError(f"algorithm {cfg.algorithm!r} does not train; there are no distillation settings")
    o = cfg.optim
    choices = tuple(cfg.sfdv.num_steps_choices) if cfg.algorithm == "sfd-v" else None
    return DistillSettings(
        algorithm="vanilla" if cfg.algorithm == "vanilla" else "sfd",
        grid=grid_spec(cfg),
        num_steps_choices=choices,
        teacher_solver=cfg.solver.name,
        teacher_opts=dict(cfg.solver.opts),
        teacher_afs=cfg.solver.afs if teacher_afs is None else teacher_afs,
        teacher_step=teacher_step,
        m=cfg.solver.m,
        loss=cfg.loss.name,
        loss_opts=dict(cfg.loss.opts),
        final_loss=cfg.loss.final,
        lr=o.lr,
        betas=(o.betas[0], o.betas[1]),
        eps=o.eps,
        lr_decay_at=o.lr_decay_at,
        lr_decay_factor=o.lr_decay_factor,
        batch_size=o.batch_size,
        micro_batch_size=o.micro_batch_size,
        total_kimg=o.total_kimg,
        num_classes=num_classes,
        precision=cfg.precision,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        channels_last=cfg.channels_last,
        group_norm=cfg.group_norm,
        seed=cfg.seed,
        vanilla_data_free=cfg.vanilla.data == "teacher",
        nan_check_every=o.nan_check_every,
    )
