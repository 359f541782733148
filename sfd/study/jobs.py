"""A trial's tracked run as a picklable job, and running one from this process (a worker process runs the same):
in it, or for a `ddp: N` config under torchrun (`ddp.run_ddp_job`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from sfd.progress import Bars
from sfd.runner import RunResult, run_experiment
from sfd.tracking import TAG_STUDY, Tracker

from .ddp import run_ddp_job


@dataclass
class Job:
    """One tracked run: the resolved config and where and how it is logged (all picklable)."""
    cfg: Any  # sfd.config.RunConfig
    experiment: str
    tracking_uri: str
    parent_run_id: str | None = None
    tags: dict = field(default_factory=dict)
    objective: list = field(default_factory=list)
    smoke: bool = False
    save_student: bool | None = None
    progress: bool = False  # a worker sends its run's progress to the study process (sfd.progress.SentBars)


def child_run_name(job: Job) -> str:
    """A trial's MLflow run name: its row id (`trial-<n>` in a search), without the study's name, which its parent
    run and experiment already show (sfd.study.configs names the config `<study>/<row>`)."""
    return job.cfg.name.removeprefix(f"{job.tags.get(TAG_STUDY)}/")


def run_job(job: Job, on_start: Callable[[str], None] | None = None, progress: Bars | None = None) -> RunResult:
    """Run `job` in this process, or with `ddp` > 1 on that many processes under torchrun (no progress bars; it
    raises `ddp.RunFailed` or `ddp.RunKilled` when the run did not finish). `on_start(run_id)` as in
    `sfd.tracking.Tracker`; `progress` as in `sfd.runner.run_experiment`."""
    if job.cfg.ddp > 1:
        return run_ddp_job(job, on_start)
    tracker = Tracker(job.experiment, tracking_uri=job.tracking_uri, parent_run_id=job.parent_run_id,
                      tags=job.tags, objective=job.objective, on_start=on_start, run_name=child_run_name(job))
    return run_experiment(job.cfg, tracker=tracker, smoke=job.smoke, progress=progress, save_student=job.save_student)
