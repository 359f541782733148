"""The study's Optuna bookkeeping, kept apart from where trials run (`serial`, `devices`): which trial next, the
run each trial is (its config, tags and the saved student it reads), and how its outcome is told (finish, fail, interrupt).
Only the study process writes the Optuna study."""
from __future__ import annotations

import math
import sys
import time
from functools import partial
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from sfd import tracking as T
from sfd.config import replace
from sfd.metrics.names import COST_KEY, CPU_TIME_KEY

from .configs import objective_labels, row_config, student_row, trial_config
from .jobs import Job
from .plan import may_start, next_to_start, waits_for
from .record import INTERRUPTED, NOT_STARTED, student_row_run_id, recorded_config, row_key, row_trials
from .spec import StudyError, StudySpec


def make_sampler(spec: StudySpec, parallel: bool = False) -> optuna.samplers.BaseSampler:
    """The study's seeded sampler. With trials running side by side TPE assumes the running ones scored badly
    (constant liar), so parallel workers do not all try the same point."""
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, constant_liar=parallel)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    if spec.sampler == "grid":
        return StudyGridSampler({k: d["choices"] for k, d in spec.space.items()}, seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=spec.seed)  # "rows": every trial is enqueued; "random"


class StudyGridSampler(optuna.samplers.GridSampler):
    def after_trial(self, study, trial, state, values) -> None:
        """Optuna's own calls `study.stop()` at the grid's end, which works only inside `study.optimize`; the trial
        loop asks `TrialLoop.grid_done` before each new trial instead."""


def suggest(trial: optuna.Trial, key: str, dist: dict):
    if dist["type"] == "categorical":
        return trial.suggest_categorical(key, dist["choices"])
    if dist["type"] == "float":
        return trial.suggest_float(key, dist["low"], dist["high"], log=bool(dist.get("log", False)))
    return trial.suggest_int(key, dist["low"], dist["high"], log=bool(dist.get("log", False)))


def recover_interrupted(study: optuna.Study, storage: optuna.storages.BaseStorage, client) -> list[FrozenTrial]:
    """Trials left RUNNING by a process that died: their MLflow runs and themselves end FAILED. Returns them."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                if client.get_run(run_id).info.status == "RUNNING":
                    T.mark_failed(client, run_id, INTERRUPTED)
            except Exception as exc:  # noqa: BLE001 - a missing run must not block the resume
                print(f"note: could not mark MLflow run {run_id} failed: {exc}", file=sys.stderr)
        interrupt_stored(storage, study.study_name, trial, INTERRUPTED)
    return stale


def interrupt_stored(storage: optuna.storages.BaseStorage, study_name: str, trial: FrozenTrial, reason: str) -> None:
    """Mark a trial this process did not ask for (RUNNING or WAITING) interrupted: FAIL, rerun next time."""
    study_id = storage.get_study_id_from_name(study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    storage.set_trial_user_attr(trial_id, "interrupted", True)
    storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def quietly(action: Callable, *args) -> None:
    """While stopping: one trial that cannot be recorded (a storage error) must not keep the others RUNNING;
    the next start of the study recovers it."""
    try:
        action(*args)
    except Exception as exc:  # noqa: BLE001
        print(f"note: while stopping: {type(exc).__name__}: {exc}", file=sys.stderr)


class TrialLoop:
    """Ask Optuna for each trial, say which run it is, and tell Optuna the outcome. A launcher (`serial.run_here`,
    `devices.run_on`) runs the jobs and reports each outcome here."""

    def __init__(self, spec: StudySpec, study: optuna.Study, smoke: bool, experiment: str, tracking_uri: str,
                 parent_id: str, say: Callable[[str], None], progress: bool = False):
        self.spec, self.study, self.smoke, self.say = spec, study, smoke, say
        self.progress = progress  # say which trial starts, and draw bars over its training and evaluation
        self.experiment, self.tracking_uri, self.parent_id = experiment, tracking_uri, parent_id
        # rows whose student another row reads (a second stage's first stage, a student `evaluate` samples)
        self.student_rows = {ref[1] for ref in map(partial(student_row, spec), spec.rows) if ref is not None}
        self.failed: list[tuple[int, str]] = []
        self.started = 0  # trials started in this invocation (at most the planned number)
        self.ran = 0  # trials that ended (complete or failed) in this invocation

    # one trial

    def label(self, trial) -> str:
        seed = trial.user_attrs.get("seed")
        name = trial.user_attrs.get("row") if self.spec.rows else None
        return (name or f"trial {trial.number}") + (f" seed {seed}" if seed is not None else "")

    def job(self, trial: optuna.Trial, worker=None) -> Job:
        """The trial's run: its row's (or the sampler's) config, its tags, where it is logged; on a `worker`
        (its `device` and `config_device`), pinned there. Raises if the trial cannot run (a row the YAML no
        longer has, a first stage that did not finish)."""
        spec = self.spec
        row_id = row_key(trial)[0] if spec.rows else None
        tags = {T.TAG_STUDY: spec.name, T.TAG_TRIAL: trial.number, T.TAG_KIND: spec.kind}
        if spec.rows:
            cfg = self.row_run(trial, tags)
        else:
            cfg = trial_config(spec, self.suggest_params(trial), trial.number)
            trial.set_user_attr("config", recorded_config(cfg))
        if worker is not None:
            cfg = replace(cfg, {"device": worker.config_device})
            tags[T.TAG_WORKER_DEVICE] = worker.device
        return Job(cfg, self.experiment, self.tracking_uri, self.parent_id, tags, list(spec.metrics), self.smoke,
                   save_student=True if row_id in self.student_rows else None,
                   progress=self.progress and worker is not None)

    def row_run(self, trial: optuna.Trial, tags: dict):
        """A table study's trial: its row's config (recorded on the trial), its replicate seed, and a `row:<id>`
        saved student (a second stage's first stage, a student `evaluate` samples) replaced by that row's finished
        run id; its tags added to `tags`."""
        spec = self.spec
        row_id, seed = row_key(trial)
        row = spec.row(row_id)
        if row is None:
            raise StudyError(f"study {spec.name}: trial {trial.number} names row {row_id!r}, which the study "
                             "YAML no longer has")
        tags[T.TAG_ROW] = row_id
        cfg = row_config(spec, row)
        trial.set_user_attr("config", recorded_config(cfg))
        if seed is not None:
            cfg = replace(cfg, {"seed": seed})
        ref = student_row(spec, row)
        if ref is not None:
            key, target = ref
            run_id = student_row_run_id(spec, self.study.get_trials(deepcopy=False), row_id, target, seed)
            cfg = replace(cfg, {key: run_id})
            tags[T.SAVED_STUDENT_TAGS[key][1]] = target
        return cfg

    def announce(self, trial, todo: int, where: str | None = None) -> None:
        """With progress on: which trial has started, as the how-many-th of this invocation's `todo`."""
        if self.progress:
            self.say(f"[{trial.number}] {self.label(trial)}: started ({self.started} of {todo})"
                     + (f" on {where}" if where else ""))

    def finish(self, trial: optuna.Trial, objective: list[float], metrics: dict, t0: float) -> None:
        if any(math.isnan(v) for v in objective):  # Optuna would fail it without a reason
            self.fail(trial, f"ObjectiveNotANumber: the run finished but its objective is {objective}", t0)
            return
        for key in ("train/wall_s", CPU_TIME_KEY, COST_KEY, "total/wall_s", "nfe"):
            trial.set_user_attr(key, metrics.get(key))
        self.study.tell(trial, objective[0] if len(objective) == 1 else list(objective))
        self.ran += 1
        shown = ", ".join(f"{m}={v:.4g}" for m, v in zip(objective_labels(self.spec, self.smoke), objective))
        took = metrics.get("total/wall_s")  # the run's own tracked wall time
        self.say(f"[{trial.number}] {self.label(trial)}: {shown}" + (f" ({took:.1f}s)" if took is not None else ""))

    def fail(self, trial: optuna.Trial, reason: str, t0: float) -> None:
        """The trial failed for a reason of its own: recorded, and the study goes on."""
        trial.set_user_attr("fail_reason", reason[:2000])
        self.failed.append((trial.number, reason))
        self.study.tell(trial, state=TrialState.FAIL)
        self.ran += 1
        self.say(f"[{trial.number}] {self.label(trial)}: FAILED after {time.perf_counter() - t0:.1f}s: {reason}")

    def interrupt(self, trial: optuna.Trial, how: str, why: str = INTERRUPTED) -> None:
        """Stopped (Ctrl-C, SIGTERM) or not started: not the trial's fault; a rerun of the study tries it again."""
        trial.set_user_attr("fail_reason", f"{why} ({how})"[:2000])
        trial.set_user_attr("interrupted", True)
        self.study.tell(trial, state=TrialState.FAIL)

    # which trial next

    def waits_for(self, trial) -> tuple | None:
        """(row, seed) of the row whose student this row reads (its first stage, or the student it evaluates)."""
        return waits_for(self.spec, row_key(trial))

    def waiting(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))

    def grid_done(self) -> bool:
        """A grid search has started every point and no retry is queued. (Optuna's `is_exhausted` counts only
        finished points, so trials running side by side would repeat a point.)"""
        size = math.prod(len(d["choices"]) for d in self.spec.space.values())
        started = {t.system_attrs.get("grid_id") for t in self.study.get_trials(deepcopy=False)
                   if t.state != TrialState.WAITING} - {None}
        return len(started) >= size and not self.waiting()

    def ask(self) -> optuna.Trial | None:
        """A new trial from Optuna (a table study's next queued row; a search's next point, suggested at once so
        that a trial stopped before its run still has its point to retry), or None when there is none."""
        if self.spec.rows and not self.waiting():
            return None
        if not self.spec.rows and self.spec.sampler == "grid" and self.grid_done():
            return None
        trial = self.study.ask()
        if not self.spec.rows:
            self.suggest_params(trial)
        return trial

    def next_trial(self, held: list, busy: list) -> optuna.Trial | None:
        """A trial ready to start, or None (`plan.next_to_start` with `plan.may_start`, as the dry run replays
        it). `held`: second stages asked for and held back; `busy`: the trials running."""
        def ready(trial) -> bool:
            return may_start(self.waits_for(trial), map(row_key, busy), map(row_key, held),
                             map(row_key, self.waiting()))

        return next_to_start(held, self.ask, ready)

    def suggest_params(self, trial: optuna.Trial) -> dict:
        """The search trial's point (asking again returns the same values)."""
        return {k: suggest(trial, k, d) for k, d in self.spec.space.items()}

    def not_started(self, held: list, todo: int) -> None:
        """Second-stage rows asked for but not run (the `--n-trials` limit was reached while they waited for
        their first stage): queued again by the next run of the study."""
        for trial in held:
            self.interrupt(trial, f"--n-trials {todo} was reached while it waited for its first stage row "
                           f"{self.waits_for(trial)[0]!r}", why=NOT_STARTED)
        held.clear()

    def first_stage_interrupted(self, trial) -> str | None:
        """The first-stage row whose latest trial was interrupted (its worker was stopped), if this trial is a
        second stage waiting for it; that row runs again next time, and so must this one."""
        key = self.waits_for(trial)
        if key is None:
            return None
        mine = row_trials(self.study.get_trials(deepcopy=False), key)
        return key[0] if mine and mine[-1].user_attrs.get("interrupted") else None
