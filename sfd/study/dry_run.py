"""The dry run: what `run_study` with the same options would do now, after the same checks, replaying the trial
loop's start rule (`plan.may_start`: the first queued trial that may start is the next) on (row, seed) keys;
creates nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from sfd.storelock import without_password

from .configs import objective_labels, student_row
from .lock import lock_holder, shared
from .peers import read_storage, stale_numbers
from .plan import may_start, rows_left, search_left, trial_limit, waits_for
from .preflight import CheckedStudy, check_everything
from .record import interrupted, row_key, row_trials, shown_trial
from .spec import StudySpec


@dataclass
class StudyPlan:
    name: str
    optuna_study: str
    storage: str
    tracking_uri: str
    on_record: int  # trials the Optuna study already holds (0: a new study)
    to_run: int  # trials a run of the same command would start now
    lines: list[tuple[str, str, str]]  # (row / trial, what a run would do, its settings)
    running_elsewhere: str | None  # the lock's note, when another process is running a sqlite study now
    assumption: str | None = None  # what the prediction takes for granted, if anything
    devices: list[str] | None = None  # the worker devices trials would run on (None: one at a time, in the process)
    missing: Exception | None = None  # every asset the study needs that is not here: a run would stop on it


def plan_study(name_or_path: str, *, smoke: bool = False, storage: str | None = None,
               tracking_uri: str | None = None, n_trials: int | None = None, retry_failed: bool = False,
               seeds: list[int] | None = None, devices: list[str] | None = None,
               heartbeat_s: int | None = None) -> StudyPlan:
    """What `run_study` with these options would do now, after the same checks; creates nothing (no store, no
    study, no lock, no run). Missing assets do not stop it: the plan says which (`missing`), and that a run would
    stop on them."""
    checked = check_everything(name_or_path, smoke, storage, tracking_uri, n_trials, seeds, devices, retry_failed,
                               heartbeat_s)
    spec = checked.spec
    study_name = spec.experiment(smoke)
    trials = checked.recorded.get_trials(deepcopy=False) if checked.recorded is not None else []
    limit = trial_limit(spec, smoke, n_trials)
    holder = lock_holder(study_name, checked.storage_url)
    live = live_trials(checked.storage_url, study_name, trials, holder, checked.heartbeat_s)
    where = "in that process" if holder else "in another process"
    make = plan_rows if spec.rows else plan_search
    lines, to_run = make(checked, trials, smoke, retry_failed, limit, live, where)
    waiting_rows = any(student_row(spec, r) for r in spec.rows)
    assumption = ("trials end in the order they start (with several workers, which second stage can start "
                  "before --n-trials is reached depends on that)" if waiting_rows and limit is not None
                  and len(checked.devices or []) > 1 else None)
    return StudyPlan(spec.name, study_name, without_password(checked.storage_url),
                     without_password(checked.tracking_uri), len(trials), to_run, lines, holder, assumption,
                     checked.devices, checked.missing)


def live_trials(storage_url: str, study_name: str, trials: list[FrozenTrial], holder: str | None,
                heartbeat_s: int) -> set[int]:
    """The numbers of the RUNNING trials a live process runs: on sqlite all of them while another process holds
    the study's lock (else none: a run would settle them); on PostgreSQL those whose heartbeat is fresh."""
    running = {t.number for t in trials if t.state == TrialState.RUNNING}
    if not running or not shared(storage_url):
        return running if holder else set()
    storage = read_storage(storage_url, heartbeat_s)
    return running - stale_numbers(optuna.load_study(study_name=study_name, storage=storage), storage)


def settings(cfg) -> str:
    """The settings a study varies, as one short line."""
    s = cfg.student
    sampled = f"{cfg.algorithm} {cfg.solver.name} NFE {s.nfe} t_min {s.t_min:g} AFS {'yes' if s.afs else 'no'}"
    if cfg.algorithm == "baseline":  # the teacher sampled directly: nothing is trained
        return sampled
    if cfg.algorithm == "evaluate":  # a saved student sampled as it is (a row:<id> is resolved when it runs)
        guided = f" guidance {s.guidance:g}" if s.guidance != 1.0 else ""
        return (f"evaluate {cfg.evaluate.student} NFE {s.nfe} t_min {s.t_min:g} AFS {'yes' if s.afs else 'no'}"
                + guided)
    if cfg.algorithm == "sfd-v":  # one model trained over several student grids
        sampled += f" (trains N in {list(cfg.sfdv.num_steps_choices)})"
    return f"{sampled} {cfg.loss.name} {cfg.optim.total_kimg:g} kimg"


def why_again(last: FrozenTrial) -> str:
    """Why a (row, seed) that has trials on record, and none running now, runs again."""
    if last.state == TrialState.RUNNING:
        return "runs again (left RUNNING by a process that ended)"
    if last.user_attrs.get("interrupted"):
        return "runs again (interrupted)"
    return "runs again (--retry-failed)"


def outcome_text(spec: StudySpec, smoke: bool, trial: FrozenTrial) -> str:
    if trial.values:
        shown = ", ".join(f"{m}={v:.4g}" for m, v in zip(objective_labels(spec, smoke), trial.values))
        return f"done: {shown} (trial {trial.number})"
    return f"failed, kept (--retry-failed runs it again): {trial.user_attrs.get('fail_reason', '?')}"


def simulate_starts(order: list, first_stage_of: Callable[[tuple], tuple | None], limit: int | None,
                    workers: int, running: Iterable[tuple] = ()) -> list:
    """The trial loop's choice of trials, replayed on (row, seed) keys with its own rule (the first queued one that
    may start): which it starts, in order. `running`: keys other processes run now, which end first. With several
    workers it assumes that trials end in the order they started."""
    queue, others, mine, started = list(order), list(running), [], []
    limit = len(order) if limit is None else limit

    def ready(key) -> bool:
        return may_start(first_stage_of(key), others + mine, queue)

    while True:
        while len(mine) < workers and len(started) < limit:
            key = next((k for k in queue if ready(k)), None)
            if key is None:
                break
            queue.remove(key)
            started.append(key)
            mine.append(key)
        if others:
            others.pop(0)
        elif mine:
            mine.pop(0)
        else:
            return started


def plan_rows(checked: CheckedStudy, trials: list[FrozenTrial], smoke: bool, retry_failed: bool,
              limit: int | None, live: set[int], where: str) -> tuple[list[tuple[str, str, str]], int]:
    """One line per (row, seed) in YAML order, and how many trials would run now."""
    spec = checked.spec
    running = [row_key(t) for t in trials if t.number in live]
    queued, new = rows_left(spec, trials, retry_failed, checked.skipped, running=set(running))
    order = queued + new
    started = simulate_starts(order, lambda key: waits_for(spec, key), limit, len(checked.devices or [None]),
                              running)
    lines = []
    for row in spec.rows:
        for seed in spec.replicates():
            key, label = (row["id"], seed), row["id"] + (f" seed {seed}" if seed is not None else "")
            if row["id"] in checked.skipped:
                lines.append((label, f"skipped: {checked.skipped[row['id']]}", "–"))
                continue
            mine = row_trials(trials, key)
            if key in started:
                plan = "queued" if mine and mine[-1].state == TrialState.WAITING else (
                    why_again(mine[-1]) if mine else "runs")
            elif key in order:
                plan = f"waits: beyond --n-trials {limit}"
            elif key in running:
                plan = f"running now, {where}"
            else:
                plan = outcome_text(spec, smoke, shown_trial(mine))
            lines.append((label, plan, settings(checked.configs[row["id"]])))
    return lines, len(started)


def plan_search(checked: CheckedStudy, trials: list[FrozenTrial], smoke: bool, retry_failed: bool,
                limit: int | None, live: set[int], where: str) -> tuple[list[tuple[str, str, str]], int]:
    """One line per trial on record, one for what the sampler would add, and how many trials would run now."""
    spec = checked.spec
    retry, n = search_left(spec, trials, retry_failed, limit, live)

    def what(t) -> str:  # what happened; the "next" line says what a run would retry
        if t.state == TrialState.RUNNING:
            return f"running now, {where}" if t.number in live else "left RUNNING by a process that ended"
        if interrupted(t):
            return "interrupted"
        if t.state == TrialState.FAIL:
            return f"failed: {t.user_attrs.get('fail_reason', '?')}"
        return outcome_text(spec, smoke, t) if t.state == TrialState.COMPLETE else t.state.name.lower()

    lines = [(f"trial {t.number}", what(t), ", ".join(f"{k}={v}" for k, v in t.params.items())) for t in trials]
    space = ", ".join(f"{k} in {d['choices'] if d['type'] == 'categorical' else [d['low'], d['high']]}"
                      for k, d in spec.space.items())
    retried = f"{len(retry)} interrupted or failed point(s) again, then " if retry else ""
    lines.append(("next", f"{n} trial(s): {retried}{spec.sampler} sampler (seed {spec.seed}) over {space}",
                  "base: " + settings(checked.configs["base"])))
    return lines, n
