"""The study's Optuna bookkeeping, kept apart from where trials run (`serial`, `devices`): which trial next (claimed
from the queue every process running the study shares), the run each trial is (its config, tags and the saved
student it reads), how its outcome is told (finish, fail, interrupt), and what becomes of a trial whose process
will never tell it (its finished run adopted; else its run failed and its row queued again). Only study processes
write the Optuna study; workers write only their runs."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from sfd import tracking as T
from sfd.config import replace
from sfd.metrics.names import COST_KEY, CPU_TIME_KEY

from .configs import objective_labels, row_config, student_row, trial_config
from .jobs import Job
from .lock import setup_lock, shared
from .peers import GRACE_FACTOR, Heartbeats, claim, queue_blank, stale_numbers, trial_id
from .plan import enqueue_left, may_start, room_for_new, unfinished, unlisted_queue, waits_for
from .record import INTERRUPTED, recorded_config, row_key, row_trials, student_row_run_id
from .spec import StudyError, StudySpec

STALE = ("interrupted: its process stopped recording heartbeats (none for {grace:g}s): it was killed, or its "
         "machine stopped")
KILLED = "killed"  # user attribute of a trial whose worker was killed from outside (counted for the retry limit)
MAX_KILLED_ATTEMPTS = 3  # a row whose worker is killed from outside runs at most this many times in a row
RESULT_KEYS = ("train/wall_s", CPU_TIME_KEY, COST_KEY, "total/wall_s", "nfe")  # run metrics kept on the trial


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


def objective_of(run, spec: StudySpec) -> list[float] | None:
    """The objective values a finished run logged (`objective`, `objective_1`, ...), or None if it logged none."""
    keys = ["objective"] + [f"objective_{i}" for i in range(1, len(spec.metrics))]
    values = [run.data.metrics.get(key) for key in keys]
    return None if any(v is None for v in values) else values

def killed_in_a_row(trials: list[FrozenTrial]) -> int:
    """How many of the last `trials` (one row's or point's, in order) were killed from outside, in a row."""
    count = 0
    for t in reversed(trials):
        if not t.user_attrs.get(KILLED):
            break
        count += 1
    return count


@dataclass
class Stores:
    """A study's stores once set up: its Optuna study and storage, and its MLflow client, experiment and parent run."""
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    storage_url: str
    client: Any
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_id: str


class TrialLoop:
    """Claim each trial from the study's queue, say which run it is, and tell Optuna the outcome. A launcher
    (`serial.run_here`, `devices.run_on`) runs the jobs and reports each outcome here. Every process running the
    study (peers on a PostgreSQL storage; one process on sqlite) runs the same loop on the same queue."""

    def __init__(self, spec: StudySpec, stores: Stores, smoke: bool, say: Callable[[str], None], *,
                 heartbeats: Heartbeats, limit: int | None = None, retry_failed: bool = False,
                 skipped: dict | None = None, poll_s: float = 5.0, progress: bool = False):
        self.spec, self.stores, self.smoke, self.say = spec, stores, smoke, say
        self.study, self.storage = stores.study, stores.storage
        self.experiment, self.tracking_uri, self.parent_id = stores.experiment, stores.tracking_uri, stores.parent_id
        self.heartbeats, self.limit, self.retry_failed = heartbeats, limit, retry_failed
        self.skipped, self.poll_s = dict(skipped or {}), poll_s
        self.progress = progress  # say which trial starts, and draw bars over its training and evaluation
        # rows whose student another row reads (a second stage's first stage, a student `evaluate` samples)
        self.student_rows = {ref[1] for ref in map(partial(student_row, spec), spec.rows) if ref is not None}
        self.failed: list[tuple[int, str]] = []
        self.mine: dict[int, int] = {}  # trial number -> storage id of the trials this process claimed, not yet told
        self.started = 0  # trials started in this invocation (at most `limit`)
        self.todo = 0  # trials this invocation expected to start when it began (others may come back to the queue)
        self.ran = 0  # trials that ended (complete or failed) in this invocation
        self._waiting_said = False

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

    def announce(self, trial, where: str | None = None) -> None:
        """With progress on: which trial has started, as the how-many-th of the `todo` this invocation expected."""
        if self.progress:
            self.say(f"[{trial.number}] {self.label(trial)}: started ({self.started} of "
                     f"{max(self.todo, self.started)})" + (f" on {where}" if where else ""))

    def finish(self, trial, objective: list[float], metrics: dict, t0: float) -> None:
        """The trial's run finished: tell Optuna its objective (a NaN objective fails it, with the reason)."""
        if any(math.isnan(v) for v in objective):  # Optuna would fail it without a reason
            self.fail(trial, f"ObjectiveNotANumber: the run finished but its objective is {objective}", t0)
            return
        with self._telling(trial):
            self._set_attrs(trial.number, {key: metrics.get(key) for key in RESULT_KEYS})
            self.study.tell(trial.number, objective[0] if len(objective) == 1 else list(objective))
            self.ran += 1
            shown = ", ".join(f"{m}={v:.4g}" for m, v in zip(objective_labels(self.spec, self.smoke), objective))
            took = metrics.get("total/wall_s")  # the run's own tracked wall time
            self.say(f"[{trial.number}] {self.label(trial)}: {shown}" + (f" ({took:.1f}s)" if took is not None else ""))

    def fail(self, trial, reason: str, t0: float) -> None:
        """The trial failed for a reason of its own: recorded, and the study goes on."""
        with self._telling(trial):
            self._set_attrs(trial.number, {"fail_reason": reason[:2000]})
            self.study.tell(trial.number, state=TrialState.FAIL)
            self.failed.append((trial.number, reason))
            self.ran += 1
            self.say(f"[{trial.number}] {self.label(trial)}: FAILED after {time.perf_counter() - t0:.1f}s: {reason}")

    def interrupt(self, trial, how: str, why: str = INTERRUPTED) -> None:
        """Stopped (Ctrl-C, SIGTERM) before its outcome was told: not the trial's fault, so a rerun of the study
        (or a peer) tries it again, unless its run had already finished, which is adopted (`settle`)."""
        self.settle(trial.number, f"{why} ({how})"[:2000])

    def killed(self, trial, how: str, t0: float) -> None:
        """Its worker was killed from outside (SIGKILL, SIGTERM: preemption, an operator): an interruption, so
        the row (or point) is queued again at once, up to MAX_KILLED_ATTEMPTS attempts in a row; the last one
        that is killed too stays failed (`--retry-failed` runs it again)."""
        attempt = 1 + killed_in_a_row(self._attempts(trial)[:-1])
        if attempt >= MAX_KILLED_ATTEMPTS:
            self.fail(trial, f"WorkerKilled: {how}, on each of {attempt} attempts in a row", t0)
        else:
            self.settle(trial.number, f"interrupted: {how} (attempt {attempt} of {MAX_KILLED_ATTEMPTS}; it runs "
                        "again)", killed=True)
            self.say(f"[{trial.number}] {self.label(trial)}: {how}; queued again (attempt {attempt + 1} of "
                     f"{MAX_KILLED_ATTEMPTS})")

    def settle(self, number: int, reason: str, *, killed: bool = False) -> str | None:
        """A trial its process will not tell (it was stopped, its worker was killed, or its process died): its
        run is found by the tags it was created with (also when the trial never recorded the run's id). A run
        that FINISHED with its objective is adopted (the trial completes with it: nothing finished is run again);
        otherwise its runs still RUNNING end FAILED with `reason`, the trial is linked to its latest run and
        fails as interrupted, so its row (or point) is queued again. Returns "adopted" or "interrupted" (None if
        another process settled it first)."""
        runs = T.trial_runs(self.stores.client, self.stores.experiment_id, self.parent_id, number)
        finished = [r for r in runs if r.info.status == "FINISHED" and objective_of(r, self.spec) is not None]
        trial = self.storage.get_trial(trial_id(self.storage, self.study, number))
        try:
            if finished:
                run = finished[-1]
                self._set_attrs(number, {"mlflow_run_id": run.info.run_id})
                self.say(f"[{number}] {self.label(trial)}: its run {run.info.run_id} had finished: adopted")
                self.finish(trial, objective_of(run, self.spec), dict(run.data.metrics), time.perf_counter())
                return "adopted"
            for run in runs:
                if run.info.status == "RUNNING":
                    T.mark_failed(self.stores.client, run.info.run_id, reason)
            attrs = {"fail_reason": reason, "interrupted": True, **({KILLED: True} if killed else {})}
            if runs:
                attrs["mlflow_run_id"] = runs[-1].info.run_id
            with self._telling(trial):
                self._set_attrs(number, attrs)
                self.study.tell(number, state=TrialState.FAIL)
            return "interrupted"
        except UpdateFinishedTrialError:  # told meanwhile by the process that ran it, or by a peer
            return None

    def _set_attrs(self, number: int, attrs: dict) -> None:
        tid = trial_id(self.storage, self.study, number)
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(tid, key, value)

    @contextlib.contextmanager
    def _telling(self, trial):
        """Tell Optuna about a trial of this process: it stops beating first. If a peer settled it meanwhile (this
        process's heartbeat stalled for longer than the grace period, so it was taken for dead), say so."""
        tid = self.mine.pop(trial.number, None)
        if tid is not None:
            self.heartbeats.discard(tid)
        try:
            yield
        except UpdateFinishedTrialError:
            if tid is None:
                raise
            self.say(f"[{trial.number}] {self.label(trial)}: another process took this trial for dead (no heartbeat "
                     f"for over {GRACE_FACTOR} intervals) and settled it first; this outcome is not recorded")

    def _attempts(self, trial) -> list[FrozenTrial]:
        """The trials of `trial`'s row and seed (in a search: of its point), in order, `trial` last."""
        trials = [t for t in self.study.get_trials(deepcopy=False) if t.number <= trial.number]
        if self.spec.rows:
            return row_trials(trials, row_key(trial))
        return [t for t in trials if t.params == trial.params]

    # which trial next

    def refresh(self, first: bool = False) -> tuple[int, int]:
        """Under the study's set-up lock, `_refresh`. Returns how many dead trials were (interrupted, adopted)."""
        with setup_lock(self.study.study_name, self.stores.storage_url):
            return self._refresh(first)

    def _refresh(self, first: bool) -> tuple[int, int]:
        """Settle the trials whose process died, then queue what is left (rows and seeds, or interrupted search
        points; a search's next new point too, when nothing waits and the study has room). `first`, at this
        process's start: on sqlite every RUNNING trial is then dead (the study lock this process holds proves that
        no other process runs the study), queued rows the YAML no longer runs are taken off the queue, and failed
        rows are queued again if `retry_failed`. On PostgreSQL a trial is dead once its heartbeat is stale, however
        many peers run. Call it holding the study's set-up lock."""
        spec, study = self.spec, self.study
        if first and not shared(self.stores.storage_url):
            dead = {t.number: INTERRUPTED for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        else:
            grace = GRACE_FACTOR * self.heartbeats.interval_s  # (this process's own trials are alive)
            dead = {n: STALE.format(grace=grace) for n in stale_numbers(study, self.storage) - set(self.mine)}
        outcomes = [self.settle(number, reason) for number, reason in dead.items()]
        if first:
            for trial, reason in unlisted_queue(spec, study.get_trials(deepcopy=False), self.skipped):
                interrupt_stored(self.storage, study.study_name, trial, reason)
        enqueue_left(spec, study, self.retry_failed and first, self.skipped)
        if not first and not spec.rows and self._search_has_room():
            queue_blank(study)
        return outcomes.count("interrupted"), outcomes.count("adopted")

    def _search_has_room(self) -> bool:
        """Nothing waits, the study has room for another point, and a grid search has points left."""
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials) or not room_for_new(self.spec, trials):
            return False
        return not (self.spec.sampler == "grid" and self.grid_done())

    def grid_done(self) -> bool:
        """A grid search has started every point and no retry is queued. (Optuna's `is_exhausted` counts only
        finished points, so trials running side by side would repeat a point.)"""
        size = math.prod(len(d["choices"]) for d in self.spec.space.values())
        trials = self.study.get_trials(deepcopy=False)
        started = {t.system_attrs.get("grid_id") for t in trials if t.state != TrialState.WAITING} - {None}
        return len(started) >= size and not any(t.state == TrialState.WAITING for t in trials)

    def claim(self) -> optuna.Trial | None:
        """The next trial this process runs, or None when none may start now: the first queued trial that does not
        read the student of a row that is unfinished (running, queued, or interrupted and about to be queued
        again: `plan.unfinished`), claimed through Optuna's atomic pop (`peers.claim`). Settling, queueing and the
        claim happen under the study's set-up lock, so no peer queues a row again between this process's look at
        the study and its claim: a trial it claims never waits. A search trial gets its point at once, so that a
        trial stopped before its run still has its point to retry."""
        if self.at_limit():
            return None
        with setup_lock(self.study.study_name, self.stores.storage_url):
            self._refresh(first=False)
            trials = self.study.get_trials(deepcopy=False)
            busy = unfinished(trials)
            queued = [row_key(t) for t in trials if t.state == TrialState.WAITING]

            def ready(frozen: FrozenTrial) -> bool:
                return not self.spec.rows or may_start(waits_for(self.spec, row_key(frozen)), busy, queued)

            trial = claim(self.study, self.storage, self.heartbeats, ready)
        if trial is None:
            return None
        self.mine[trial.number] = trial_id(self.storage, self.study, trial.number)
        self.started += 1
        if not self.spec.rows:
            self.suggest_params(trial)
        return trial

    def at_limit(self) -> bool:
        """This process has started as many trials as it may (`--n-trials`)."""
        return self.limit is not None and self.started >= self.limit

    def suggest_params(self, trial: optuna.Trial) -> dict:
        """The search trial's point (asking again returns the same values)."""
        return {k: suggest(trial, k, d) for k, d in self.spec.space.items()}

    def others_running(self) -> int:
        """How many of the study's trials other processes are running now."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return sum(t.number not in self.mine for t in running)

    def wait_for_others(self) -> bool:
        """Nothing may start now: while other processes run trials, wait one poll interval and say True (one of
        them may finish a first stage that a queued second stage waits for, or die, and its row come back to the
        queue); False when none run, and this process is done."""
        others = self.others_running()
        if not others:
            return False
        if not self._waiting_said:
            self.say(f"waiting: {others} trial(s) of this study are running in other processes")
            self._waiting_said = True
        time.sleep(self.poll_s)
        return True
