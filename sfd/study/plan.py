"""What is left to run, and in which order trials may start: the rows (and seeds) or search points still to do,
queued rows the YAML no longer runs, and the one rule the trial loop and the dry run both follow to pick the
next trial (a row that reads another row's student, a second stage or an `evaluate` row, waits for that row)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from .configs import student_row
from .record import NOT_STARTED, row_key
from .spec import StudySpec

SMOKE_SEARCH_TRIALS = 3  # a smoke search runs this many trials unless --n-trials says otherwise
Item = TypeVar("Item")


def trial_limit(spec: StudySpec, smoke: bool, n_trials: int | None) -> int | None:
    """How many trials an invocation may start (None: every one left)."""
    return SMOKE_SEARCH_TRIALS if smoke and spec.space and n_trials is None else n_trials


def waits_for(spec: StudySpec, key: tuple) -> tuple | None:
    """(row, seed) of the row whose student the trial of (row, seed) `key` reads (a second stage's first stage,
    a student `evaluate` samples), else None."""
    row = spec.row(key[0])
    ref = student_row(spec, row) if row is not None else None
    return None if ref is None else (ref[1], key[1])


def may_start(first_stage: tuple | None, running: Iterable[tuple], held: Iterable[tuple],
              queued: Iterable[tuple]) -> bool:
    """Whether a trial that reads the student of `first_stage` ((row, seed), or None) may start now: not while
    that row is running, held back or still queued (a resumed study queues a retried first stage after the rows
    already waiting). The arguments are (row, seed) keys."""
    return first_stage is None or first_stage not in {*running, *held, *queued}


def next_to_start(held: list[Item], ask: Callable[[], Item | None],
                  ready: Callable[[Item], bool]) -> Item | None:
    """The next trial to start, or None: the first held-back one that is now `ready`, else the next one `ask`
    hands out that is ready; those handed out and not ready are held back (appended to `held`)."""
    for item in held:
        if ready(item):
            held.remove(item)
            return item
    while (item := ask()) is not None:
        if ready(item):
            return item
        held.append(item)
    return None


def rows_left(spec: StudySpec, trials: list[FrozenTrial], retry_failed: bool,
              skipped: dict) -> tuple[list, list]:
    """(queued, new): the (row, seed) keys of the trials already waiting, and the keys still to enqueue, in the
    order they run. A row is done once it completed, or failed for a reason of its own (unless retried)."""
    done = {row_key(t) for t in trials if t.state == TrialState.COMPLETE}
    if not retry_failed:  # failed for a reason of their own (not interrupted): stay failed
        done |= {row_key(t) for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")}
    dropped = {t.number for t, _ in unlisted_queue(spec, trials, skipped)}
    queued = [row_key(t) for t in trials if t.state == TrialState.WAITING and t.number not in dropped]
    new = [(r["id"], seed) for r in spec.rows for seed in spec.replicates()
           if r["id"] not in skipped and (r["id"], seed) not in done | set(queued)]
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


def search_left(spec: StudySpec, trials: list[FrozenTrial], retry_failed: bool,
                limit: int | None) -> tuple[list[dict], int]:
    """(retry, count): parameters to enqueue again and how many trials to run now."""
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    failed = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")]
    finished = completed + ([] if retry_failed else failed)
    # Retry exactly the parameters that were interrupted (killed, Ctrl-C, SIGTERM) and not tried since (and,
    # when asked, those that failed), once each. A trial still RUNNING here was left so by a process that ended
    # (a run recovers those first; a dry run sees them as they are).
    stopped = [t for t in trials if t.state == TrialState.RUNNING
               or (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))]
    interrupted = [t for t in stopped if t.params not in [u.params for u in trials if u.number > t.number]]
    have = [t.params for t in completed + waiting]
    retry = []
    for t in interrupted + (failed if retry_failed else []):
        if t.params and t.params not in have:
            retry.append(dict(t.params))
            have.append(t.params)
    target = spec.n_trials if limit is None else min(spec.n_trials, len(finished) + limit)
    return retry, max(0, target - len(finished))


def plan_trials(spec: StudySpec, study: optuna.Study, retry_failed: bool, skipped: dict,
                limit: int | None) -> int:
    """Enqueue what is left to do and return how many trials to run now."""
    trials = study.get_trials(deepcopy=False)
    if spec.rows:
        queued, new = rows_left(spec, trials, retry_failed, skipped)
        for row_id, seed in new:  # user attributes, not parameters: rows may be added to the YAML later
            study.enqueue_trial({}, user_attrs={"row": row_id, **({"seed": seed} if seed is not None else {})})
        n = len(queued) + len(new)
        return n if limit is None else min(n, limit)
    retry, n = search_left(spec, trials, retry_failed, limit)
    for params in retry:
        study.enqueue_trial(params)
    return n
