"""The serial launcher: the study's trials one after another, in this process."""
from __future__ import annotations

import time

from sfd.progress import terminal_bars
from sfd.signals import stops_deferred

from .jobs import run_job
from .loop import TrialLoop, quietly


def run_here(loop: TrialLoop, todo: int) -> None:
    """Start up to `todo` trials, each once the one before it has ended; a stop (Ctrl-C, SIGTERM) marks the
    running trial and the second stages held back for it interrupted, then goes on up."""
    held: list = []
    trial = None  # the trial asked for and not yet told
    try:
        while loop.started < todo:
            with stops_deferred():  # a stop while asking lands once the trial is ours to mark
                trial = loop.next_trial(held, [])
                if trial is None:
                    break
                loop.started += 1
            t0 = time.perf_counter()
            loop.announce(trial, todo)
            try:
                result = run_job(loop.job(trial), on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
                                 progress=terminal_bars if loop.progress else None)
            except Exception as exc:  # noqa: BLE001 - recorded as the trial's failure
                with stops_deferred():
                    loop.fail(trial, f"{type(exc).__name__}: {exc}", t0)
                    trial = None
            else:
                with stops_deferred():
                    loop.finish(trial, result.objective, result.metrics, t0)
                    trial = None
    except KeyboardInterrupt as exc:
        for stopped in [trial, *held]:  # the run, and second stages waiting for it
            if stopped is not None:
                quietly(loop.interrupt, stopped, f"{type(exc).__name__}: {exc}")
        raise
    loop.not_started(held, todo)
