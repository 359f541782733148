"""What is left to run, and in which order trials may start: the rows (and seeds) or search points still to do,
queued rows the YAML no longer runs, and the one rule the trial loop and the dry run both follow to pick the
next trial (a row that reads another row's student, a second stage or an `evaluate` row, waits for that row: the
first queued trial that may start is the next)."""
from __future__ import annotations

from typing import Any, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .configs import student_row
from .record import NOT_STARTED, interrupted, row_key
from .spec import StudySpec

SMOKE_SEARCH_TRIALS = 3  # a smoke search runs this many trials unless --n-trials says otherwise


def trial_limit(spec: StudySpec, smoke: bool, n_trials: int | None) -> int | None:
    """How many trials an invocation may start (None: every one left)."""
    return SMOKE_SEARCH_TRIALS if smoke and spec.space and n_trials is None else n_trials


def waits_for(spec: StudySpec, key: tuple) -> tuple | None:
    """(row, seed) of the row whose student the trial of (row, seed) `key` reads (a second stage's first stage,
    a student `evaluate` samples), else None."""
    row = spec.row(key[0])
    ref = student_row(spec, row) if row is not None else None
    return None if ref is None else (ref[1], key[1])


def may_start(first_stage: tuple | None, running: Iterable[tuple], queued: Iterable[tuple]) -> bool:
    """Whether a trial that reads the student of `first_stage` ((row, seed), or None) may start now: not while
    that row is running (in any process) or still queued (a resumed study queues a retried first stage after the rows
    already waiting). The arguments are (row, seed) keys."""
    return first_stage is None or first_stage not in {*running, *queued}


def unfinished(trials: list[FrozenTrial]) -> set[tuple]:
    """The (row, seed) keys that a trial reading their student may not start after yet: those running now, and
    those whose latest trial was interrupted (stopped, or its process died) and which never completed: the next
    refresh queues them again. A key that completed, or whose latest trial failed for a reason of its own, is
    settled (the reader then fails with that reason, `record.student_row_run_id`)."""
    completed = {row_key(t) for t in trials if t.state == TrialState.COMPLETE}
    latest = {row_key(t): t for t in trials if t.state != TrialState.WAITING}  # in trial order: the last wins
    return ({row_key(t) for t in trials if t.state == TrialState.RUNNING}
            | {key for key, t in latest.items() if interrupted(t) and key not in completed})


def rows_left(spec: StudySpec, trials: list[FrozenTrial], retry_failed: bool, skipped: dict,
              running: set[tuple] | None = None) -> tuple[list, list]:
    """(queued, new): the (row, seed) keys of the trials already waiting, and the keys still to enqueue, in the
    order they run. A row is done once it completed, or failed for a reason of its own (unless retried); a row
    `running` now (keys; by default every RUNNING trial's) is not queued again."""
    done = {row_key(t) for t in trials if t.state == TrialState.COMPLETE}
    if not retry_failed:  # failed for a reason of their own (not interrupted): stay failed
        done |= {row_key(t) for t in trials if t.state == TrialState.FAIL and not interrupted(t)}
    if running is None:
        running = {row_key(t) for t in trials if t.state == TrialState.RUNNING}
    dropped = {t.number for t, _ in unlisted_queue(spec, trials, skipped)}
    queued = [row_key(t) for t in trials if t.state == TrialState.WAITING and t.number not in dropped]
    new = [(r["id"], seed) for r in spec.rows for seed in spec.replicates()
           if r["id"] not in skipped and (r["id"], seed) not in done | set(queued) | running]
    return queued, new


def unlisted_queue(spec: StudySpec, trials: list[FrozenTrial], skipped: dict) -> list[tuple[Any, str]]:
    """Queued trials of rows the YAML now skips or no longer has, with why they will not run."""
    ids = {r["id"] for r in spec.rows}
    out = []
    for t in trials:
        row = t.user_attrs.get("row")
        if t.state == TrialState.WAITING and spec.rows and (row in skipped or row not in ids):
            why = (f"the study skips row {row!r} ({skipped[row]})" if row in skipped else
                   f"the study YAML no longer has row {row!r}")
            out.append((t, f"{NOT_STARTED}: {why}"))
    return out


def point(trial: FrozenTrial) -> dict:
    """A search trial's parameters; a queued trial's are those it was enqueued with (it has suggested none yet)."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


def search_left(spec: StudySpec, trials: list[FrozenTrial], retry_failed: bool, limit: int | None,
                live: set[int] | None = None) -> tuple[list[dict], int]:
    """(retry, count): parameters to enqueue again and how many trials to run now. `live`: the numbers of the
    RUNNING trials whose process still runs them (by default all); any other RUNNING trial was interrupted."""
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    failed = [t for t in trials if t.state == TrialState.FAIL and not interrupted(t)]
    running = [t for t in trials if t.state == TrialState.RUNNING and (live is None or t.number in live)]
    running_numbers = {t.number for t in running}
    finished = completed + ([] if retry_failed else failed)
    # Retry exactly the parameters that were interrupted (killed, Ctrl-C, SIGTERM, a dead process's trial still
    # RUNNING) and not tried or queued since (and, when asked, those that failed), once each.
    stopped = [t for t in trials if interrupted(t)
               or (t.state == TrialState.RUNNING and t.number not in running_numbers)]
    stopped = [t for t in stopped if t.params not in [point(u) for u in trials if u.number > t.number]]
    have = [point(t) for t in completed + waiting + running]
    retry = []
    for t in stopped + (failed if retry_failed else []):
        if t.params and t.params not in have:
            retry.append(dict(t.params))
            have.append(t.params)
    target = spec.n_trials if limit is None else min(spec.n_trials, len(finished) + len(running) + limit)
    return retry, max(0, target - len(finished) - len(running))


def room_for_new(spec: StudySpec, trials: list[FrozenTrial]) -> bool:
    """Whether a search may queue a new point: its trials that completed, failed for a reason of their own, run
    or wait (in any process) are fewer than `n_trials`."""
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
               or (t.state == TrialState.FAIL and not interrupted(t))]
    return len(counted) < spec.n_trials


def enqueue_left(spec: StudySpec, study: optuna.Study, retry_failed: bool, skipped: dict) -> None:
    """Queue what is left to do and is neither queued nor running: rows (and seeds), or interrupted search points.
    Call it under the study's `setup_lock` (peers must not both queue a row)."""
    trials = study.get_trials(deepcopy=False)
    if spec.rows:
        _, new = rows_left(spec, trials, retry_failed, skipped)
        for row_id, seed in new:  # user attributes, not parameters: rows may be added to the YAML later
            study.enqueue_trial({}, user_attrs={"row": row_id, **({"seed": seed} if seed is not None else {})})
        return
    retry, _ = search_left(spec, trials, retry_failed, None)
    for params in retry:
        study.enqueue_trial(params)


def trials_left(spec: StudySpec, trials: list[FrozenTrial], limit: int | None) -> int:
    """How many trials this process would start now: the queued ones (and a search's new points), at most `limit`."""
    if spec.rows:
        n = sum(t.state == TrialState.WAITING for t in trials)
    else:
        n = search_left(spec, trials, False, limit)[1]
    return n if limit is None else min(n, limit)
