"""The serial launcher: the study's trials one after another, in this process."""
from __future__ import annotations

import time

from sfd.progress import terminal_bars
from sfd.signals import stops_deferred

from .ddp import RunKilled
from .jobs import run_job
from .loop import TrialLoop, quietly


def run_here(loop: TrialLoop) -> None:
    """Run trials one after another until none is left to claim (waiting while other processes run some: one may
    unblock a second stage, or die and its row come back) or `loop.limit` have started; a stop (Ctrl-C, SIGTERM)
    marks the running trial interrupted, then goes on up."""
    trial = None  # the trial claimed and not yet told
    try:
        while True:
            with stops_deferred():  # a stop while claiming lands once the trial is ours to mark
                trial = loop.claim()
            if trial is None:
                if loop.at_limit() or not loop.wait_for_others():
                    return
                continue
            t0 = time.perf_counter()
            loop.announce(trial)
            try:
                result = run_job(loop.job(trial), on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
                                 progress=terminal_bars if loop.progress else None)
            except RunKilled as exc:  # a ddp run stopped from outside: queued again, a bounded number of times
                with stops_deferred():
                    loop.killed(trial, str(exc), t0)
                    trial = None
            except Exception as exc:  # noqa: BLE001 - recorded as the trial's failure
                with stops_deferred():
                    loop.fail(trial, f"{type(exc).__name__}: {exc}", t0)
                    trial = None
            else:
                with stops_deferred():
                    loop.finish(trial, result.objective, result.metrics, t0)
                    trial = None
    except KeyboardInterrupt as exc:
        if trial is not None:
            quietly(loop.interrupt, trial, f"{type(exc).__name__}: {exc}")
        raise
