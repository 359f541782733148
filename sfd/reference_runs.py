"""Runs with a student the SFD reference implementation trained (its network-snapshot-NNNNNN.pkl): evaluated as
it is (`algorithm: reference`), or as the first stage of a second stage (`second_stage.first_stage: X.pkl`).

The snapshot is read once per process (a study's checks and its run share it), with the teacher's architecture;
a snapshot that is not the run's teacher's, or whose grid the run's `student.*` settings do not state, is a
ConfigError before any run exists.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sfd.config import ConfigError, RunConfig
from sfd.teachers.edm_pickle import EDMPickleError
from sfd.teachers.reference import SFDV_NUM_STEPS, ReferenceStudent, read_reference_student
from sfd.teachers.registry import teacher_architecture

__all__ = ["load_reference", "check_reference_run", "reference_first_stage_info", "load_reference_first_stage"]

_CACHE: dict[tuple, ReferenceStudent] = {}


def load_reference(path: str, teacher: str, *, key: str = "reference.path") -> ReferenceStudent:
    """The snapshot at `path`, a student of `teacher` read with its architecture, kept for the next call on the
    same file (one file per process). A refusal (a student of another teacher too) is a ConfigError naming `key`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: got {path!r}; the file does not exist")
    stat = file.stat()
    cache_key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size, teacher)
    if cache_key not in _CACHE:
        try:
            student = read_reference_student(file, teacher=teacher, architecture=teacher_architecture(teacher))
        except EDMPickleError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        _CACHE.clear()
        _CACHE[cache_key] = student
    return _CACHE[cache_key]


def check_reference_run(cfg: RunConfig) -> ReferenceStudent:
    """algorithm=reference: the run's student grid must be the one the snapshot samples with (sample.py reads it
    from training_kwargs; an SFD-v student's N is free), so the logged config says how it was evaluated."""
    student = load_reference(cfg.reference.path, cfg.teacher.name)
    g, s = student.grid, cfg.student
    expected = {"afs": g.afs, "schedule": g.schedule, "t_min": g.t_min, "t_max": g.t_max, "rho": g.rho}
    if not student.step_condition:
        expected["nfe"] = student.nfe
    diff = {k: v for k, v in expected.items() if getattr(s, k) != v}
    if diff:
        raise ConfigError(f"reference.path: {student.describe()} samples with "
                          + ", ".join(f"student.{k}={v}" for k, v in expected.items())
                          + f" (its training_kwargs); this run differs in {', '.join(diff)}: set "
                          + " ".join(f"student.{k}={v}" for k, v in diff.items()))
    if cfg.reference.num_steps_choices and not student.step_condition:
        raise ConfigError(f"reference.num_steps_choices: got {cfg.reference.num_steps_choices}; {student.describe()} "
                          "is not step-conditioned, so it samples at its own N only (leave it null)")
    return student


def reference_first_stage_info(cfg: RunConfig) -> dict:
    """What `runner.check_first_stage` reads about a first stage (as `runner.sampling_info` writes it for ours),
    for a reference snapshot named by second_stage.first_stage."""
    student = load_reference(cfg.second_stage.first_stage, cfg.teacher.name, key="second_stage.first_stage")
    return {
        "algorithm": "reference", "teacher": student.teacher, "teacher_path": None,
        "smoke": cfg.smoke,  # a reference student is real in a smoke run too: nothing to compare
        "solver": "euler", "nfe": student.nfe, "grid": dataclasses.asdict(student.grid),
        "step_condition": student.step_condition, "step": None,
        "num_steps_choices": list(SFDV_NUM_STEPS) if student.step_condition else None,
        "guidance": 1.0, "num_classes": student.net.label_dim, "first_stage": str(student.path),
    }


def load_reference_first_stage(cfg: RunConfig, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The reference snapshot as a second stage's first stage: its network (eval mode, frozen) and its info."""
    info = reference_first_stage_info(cfg)
    net = load_reference(cfg.second_stage.first_stage, cfg.teacher.name).net
    return net.to(device).eval().requires_grad_(False), info
