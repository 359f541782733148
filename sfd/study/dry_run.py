"""The dry run: what `run_study` with the same options would do now, after the same checks, replaying the trial
loop's start rule (`plan.next_to_start`, `plan.may_start`) on (row, seed) keys; creates nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from optuna.trial import FrozenTrial, TrialState

from .configs import objective_labels, student_row
from .lock import lock_holder
from .plan import may_start, next_to_start, rows_left, search_left, trial_limit, waits_for
from .preflight import CheckedStudy, check_everything
from .record import row_trials, shown_trial
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
    running_elsewhere: str | None  # the lock's note, when another process is running the study now
    assumption: str | None = None  # what the prediction takes for granted, if anything
    devices: list[str] | None = None  # the worker devices trials would run on (None: one at a time, in the process)
    missing: Exception | None = None  # every asset the study needs that is not here: a run would stop on it


def plan_study(name_or_path: str, *, smoke: bool = False, storage: str | None = None,
               tracking_uri: str | None = None, n_trials: int | None = None, retry_failed: bool = False,
               seeds: list[int] | None = None, devices: list[str] | None = None) -> StudyPlan:
    """What `run_study` with these options would do now, after the same checks; creates nothing (no store, no
    study, no lock, no run). Missing assets do not stop it: the plan says which (`missing`), and that a run would
    stop on them."""
    checked = check_everything(name_or_path, smoke, storage, tracking_uri, n_trials, seeds, devices, retry_failed)
    spec = checked.spec
    study_name = spec.experiment(smoke)
    trials = checked.recorded.get_trials(deepcopy=False) if checked.recorded is not None else []
    limit = trial_limit(spec, smoke, n_trials)
    holder = lock_holder(study_name, checked.storage_url)
    make = plan_rows if spec.rows else plan_search
    lines, to_run = make(checked, trials, smoke, retry_failed, limit, live=holder is not None)
    waiting_rows = any(student_row(spec, r) for r in spec.rows)
    assumption = ("trials end in the order they start (with several workers, which second stage can start "
                  "before --n-trials is reached depends on that)" if waiting_rows and limit is not None
                  and len(checked.devices or []) > 1 else None)
    return StudyPlan(spec.name, study_name, checked.storage_url, checked.tracking_uri, len(trials), to_run, lines,
                     holder, assumption, checked.devices, checked.missing)


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


def why_again(last: FrozenTrial, live: bool) -> str:
    """Why a (row, seed) that has trials on record runs again (`live`: another process runs the study now)."""
    if last.state == TrialState.RUNNING:
        return "running now, in that process" if live else "runs again (left RUNNING by a process that ended)"
    if last.user_attrs.get("interrupted"):
        return "runs again (interrupted)"
    return "runs again (--retry-failed)"


def outcome_text(spec: StudySpec, smoke: bool, trial: FrozenTrial) -> str:
    if trial.values:
        shown = ", ".join(f"{m}={v:.4g}" for m, v in zip(objective_labels(spec, smoke), trial.values))
        return f"done: {shown} (trial {trial.number})"
    return f"failed, kept (--retry-failed runs it again): {trial.user_attrs.get('fail_reason', '?')}"


def simulate_starts(order: list, first_stage_of: Callable[[tuple], tuple | None], limit: int | None,
                    workers: int) -> tuple[list, list]:
    """The trial loop's choice of trials, replayed on (row, seed) keys with its own rule: which it starts, in
    order, and which second stages it holds back and leaves unstarted at the `--n-trials` limit. With several
    workers it assumes that trials end in the order they started."""
    queue, held, busy, started = list(order), [], [], []
    limit = len(order) if limit is None else limit

    def ready(key) -> bool:
        return may_start(first_stage_of(key), busy, held, queue)

    def ask():
        return queue.pop(0) if queue else None

    while True:
        while len(busy) < workers and len(started) < limit and (key := next_to_start(held, ask, ready)) is not None:
            started.append(key)
            busy.append(key)
        if not busy:
            return started, held
        busy.pop(0)


def plan_rows(checked: CheckedStudy, trials: list[FrozenTrial], smoke: bool, retry_failed: bool,
              limit: int | None, live: bool) -> tuple[list[tuple[str, str, str]], int]:
    """One line per (row, seed) in YAML order, and how many trials would run now."""
    spec = checked.spec
    queued, new = rows_left(spec, trials, retry_failed, checked.skipped)
    order = queued + new
    started, held = simulate_starts(order, lambda key: waits_for(spec, key), limit, len(checked.devices or [None]))
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
                    why_again(mine[-1], live) if mine else "runs")
            elif key in held:
                plan = (f"not started: waits for its first stage row {waits_for(spec, key)[0]!r} until --n-trials "
                        f"{limit} is reached; runs next time")
            elif key in order:
                plan = f"waits: beyond --n-trials {limit}"
            else:
                plan = outcome_text(spec, smoke, shown_trial(mine))
            lines.append((label, plan, settings(checked.configs[row["id"]])))
    return lines, len(started)


def plan_search(checked: CheckedStudy, trials: list[FrozenTrial], smoke: bool, retry_failed: bool,
                limit: int | None, live: bool) -> tuple[list[tuple[str, str, str]], int]:
    """One line per trial on record, one for what the sampler would add, and how many trials would run now."""
    spec = checked.spec
    retry, n = search_left(spec, trials, retry_failed, limit)

    def what(t) -> str:  # what happened; the "next" line says what a run would retry
        if t.state == TrialState.RUNNING:
            return "running now, in that process" if live else "left RUNNING by a process that ended"
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted"):
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
