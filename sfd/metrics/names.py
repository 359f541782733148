"""Every metric a run can compute, by the name `eval.metrics` uses, and the MLflow keys it logs: one home for
metric names, read by the config checks, the runner, `evaluate`, the study engine and the reports.

A metric knows which teachers it can score (`unfit_reason`), what it logs (teacher_gap logs its mean and
spread), which way is better, and what a smoke run computes instead of it (FID needs Inception weights and 50k
samples, and means nothing on a random teacher).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

MINIMIZE, MAXIMIZE = "minimize", "maximize"


@dataclass(frozen=True)
class Metric:
    name: str  # as `eval.metrics` names it
    logged: tuple[str, ...]  # the MLflow metric keys a run logs for it; the first is its headline value
    direction: str = MINIMIZE  # which way is better
    digits_only: bool = False  # defined for the embedded digits teachers only (their classifier, their pixels)
    needs_classes: bool = False  # needs a class-conditional teacher
    needs_classifier: bool = False  # scored in the features of the shipped digits classifier
    smoke_substitute: str | None = None  # what a smoke run computes instead


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("fid", ("fid",), smoke_substitute="teacher_gap"),
    Metric("fd_digits", ("fd_digits",), digits_only=True, needs_classifier=True),
    Metric("pixel_fd", ("pixel_fd",), digits_only=True),
    Metric("class_accuracy", ("class_accuracy",), direction=MAXIMIZE, digits_only=True, needs_classes=True,
           needs_classifier=True),
    Metric("teacher_gap", ("teacher_gap_mean", "teacher_gap_std")),
)}

# What each logged quality key means, for the reports' legends (only FID is the paper's metric).
DESCRIPTIONS = {
    "fid": "FID (Inception-v3 Fréchet distance), the paper's metric",
    "fd_digits": "fd_digits: Fréchet distance in the feature space of the embedded digits classifier — NOT FID",
    "pixel_fd": "pixel_fd: Fréchet distance on raw pixels — NOT FID",
    "class_accuracy": "class_accuracy: fraction of samples the digits classifier assigns the intended class — NOT FID",
    "teacher_gap_mean": "teacher_gap_mean: per-sample RMSE to the teacher's own samples from the same noise — NOT FID",
    "teacher_gap_std": "teacher_gap_std: spread of the per-sample RMSE to the teacher — NOT FID",
}
# Every quality key a run can log, in the order of METRICS.
QUALITY_KEYS = tuple(key for m in METRICS.values() for key in m.logged)
HIGHER_IS_BETTER = frozenset(key for m in METRICS.values() if m.direction == MAXIMIZE for key in m.logged)
# The training cost studies and reports compare (search_digits' second objective, the cost column, the Pareto
# figure): processor time, which does not grow when other processes compete for the machine as wall time does.
# On a CPU the CPU time of the run's processes (`train/cpu_s`), on CUDA the GPU time (`train/gpu_s`), in hours.
COST_KEY = "train/device_hours"
COST_LABEL = "training device-hours (processor time: CPU core-hours on a CPU, GPU-hours on a GPU)"
# Logged by every run since the cost is processor time: a trained run without it logged wall time as its cost.
CPU_TIME_KEY = "train/cpu_s"
# What every run logs besides its quality metrics: the cost and the NFE it was sampled at (CUDA runs also log
# train/gpu_s).
COST_KEYS = ("nfe", "train/wall_s", CPU_TIME_KEY, COST_KEY, "eval/wall_s", "total/wall_s")
# What a study may optimise: the quality keys and the cost (eval/wall_s is not a property of the method; wall times
# depend on what else the machine runs).
OBJECTIVE_KEYS = (*QUALITY_KEYS, COST_KEY, "train/wall_s", "total/wall_s", "nfe")


def training_cost(metrics: Mapping[str, float]) -> float | None:
    """A run's training cost in COST_KEY's sense; None for a trained run logged before the cost was processor time
    (its device-hours were wall time, which grows with the machine's load: not comparable)."""
    hours = metrics.get(COST_KEY)
    if hours is None or (hours and metrics.get(CPU_TIME_KEY) is None):
        return None
    return hours


def logged_keys(metrics) -> set[str]:
    """The MLflow keys a run that computes `metrics` (eval.metrics names) logs, cost included."""
    return set(COST_KEYS).union(*(METRICS[m].logged for m in metrics))


def smoke_metric(name: str) -> str:
    """The metric a smoke run computes for metric `name`."""
    return METRICS[name].smoke_substitute or name


def smoke_key(key: str) -> str:
    """The logged key a smoke run has for logged key `key` (fid -> teacher_gap_mean)."""
    for metric in METRICS.values():
        if metric.smoke_substitute and key == metric.logged[0]:
            return METRICS[metric.smoke_substitute].logged[0]
    return key


def unfit_reason(name: str, teacher: str, dataset: str, num_classes: int) -> str | None:
    """Why metric `name` cannot score samples of this teacher (its name, the data it models, its classes), or
    None when it can."""
    if name not in METRICS:
        return f"unknown metric {name!r}; choose from {list(METRICS)}"
    metric = METRICS[name]
    if metric.digits_only and dataset != "digits":
        return f"metric {name!r} is defined for the embedded digits teachers only, not {teacher!r}"
    if metric.needs_classes and not num_classes:
        return f"{name} needs a class-conditional teacher; {teacher!r} is unconditional"
    return None
