"""The per-device launcher: up to one trial per listed device at once, each in a worker process of its own
(`workers.DeviceWorker`); a second stage waits for its first stage. This process alone tells Optuna the
outcomes (through the `TrialLoop`)."""
from __future__ import annotations

import time
from multiprocessing.connection import wait

from sfd.progress import BarBoard
from sfd.signals import stops_deferred
from sfd.tracking import get_client, mark_failed

from .loop import TrialLoop, quietly
from .record import NOT_STARTED
from .workers import STOP_WAIT_S, DeviceWorker


def run_on(loop: TrialLoop, devices: list[str], todo: int) -> None:
    """Start up to `todo` trials, one per free worker at a time. Ctrl-C, SIGTERM or an error here stops every
    busy worker (its run ends KILLED) and marks the running and held trials interrupted."""
    workers = [DeviceWorker(d) for d in devices]
    running: dict = {}  # worker -> (trial, start time)
    held: list = []
    board = BarBoard()  # the workers' progress, one line each (drawn only when the loop shows progress)
    try:
        while True:
            for worker in workers:
                while worker not in running and loop.started < todo:
                    with stops_deferred():  # asked for, then held or running: never in between at a stop
                        trial = loop.next_trial(held, [t for t, _ in running.values()])
                        if trial is None:
                            break
                        loop.started += 1
                        _start(loop, worker, trial, running, todo)
            if not running:
                break
            ready = wait([w.conn for w in running])
            for worker in [w for w in running if w.conn in ready]:
                with stops_deferred():
                    _take(loop, worker, worker.receive(), running, board)
        loop.not_started(held, todo)
    except BaseException as exc:  # Ctrl-C, SIGTERM, or this process failed: stop the workers' runs cleanly
        board.close()
        _stop(loop, running, held, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        board.close()
        for worker in workers:
            worker.close()


def _start(loop: TrialLoop, worker: DeviceWorker, trial, running: dict, todo: int) -> None:
    t0 = time.perf_counter()
    target = loop.first_stage_interrupted(trial)
    if target is not None:
        loop.interrupt(trial, f"its first stage row {target!r} was interrupted", why=NOT_STARTED)
        return
    try:
        job = loop.job(trial, worker)
    except Exception as exc:  # noqa: BLE001 - recorded as the trial's failure
        loop.fail(trial, f"{type(exc).__name__}: {exc}", t0)
        return
    worker.submit(job)
    running[worker] = (trial, t0)
    loop.announce(trial, todo, worker.device)


def _take(loop: TrialLoop, worker: DeviceWorker, message: tuple, running: dict, board: BarBoard | None = None) -> None:
    """Act on a worker's message: its run exists, its progress (drawn on `board`), or the trial is over."""
    trial, t0 = running[worker]
    kind = message[0]
    if kind == "started":
        trial.set_user_attr("mlflow_run_id", message[1])
        return
    if kind == "progress":
        if board is not None:
            board.show(worker, loop.label(trial), *message[1:])
        return
    if board is not None:  # before the trial's line is printed
        board.clear(worker)
    if kind == "done":
        loop.finish(trial, message[1], message[2], t0)
    elif kind == "interrupted":  # the worker alone was stopped (SIGTERM): a rerun tries the trial again
        worker.retire()
        loop.interrupt(trial, message[1], why=f"interrupted: the worker on {worker.device} was stopped")
        loop.say(f"[{trial.number}] {loop.label(trial)}: interrupted on {worker.device}: {message[1]}")
    else:  # "failed", or "died" (the process ended: out of memory, a crash)
        if kind == "died":
            _end_dead_run(loop, trial, message[1])
        loop.fail(trial, message[1], t0)
    del running[worker]  # only once told: should telling fail, `_stop` still marks the trial


def _end_dead_run(loop: TrialLoop, trial, reason: str) -> None:
    """A worker that died left its trial's MLflow run RUNNING: end it FAILED with the reason."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        mark_failed(get_client(loop.tracking_uri), run_id, reason)


def _stop(loop: TrialLoop, running: dict, held: list, how: str) -> None:
    """The study process was stopped: stop every busy worker (its run ends KILLED), keep what finished, and mark
    the rest interrupted so the next run of the study tries them again."""
    for worker in running:
        worker.interrupt()
    deadline = time.monotonic() + STOP_WAIT_S
    while running and time.monotonic() < deadline:
        ready = wait([w.conn for w in running], timeout=max(0.0, deadline - time.monotonic()))
        for worker in [w for w in running if w.conn in ready]:
            message = worker.receive()
            if message[0] == "progress":  # nothing is drawn while stopping
                continue
            if message[0] in ("started", "done", "failed"):  # the run began, or ended before the stop
                quietly(_take, loop, worker, message, running)
                if message[0] != "started" and worker in running:  # its outcome could not be recorded
                    quietly(loop.interrupt, running.pop(worker)[0], how)
            else:  # stopped, or gone: the trial was interrupted by this stop
                worker.retire()
                quietly(loop.interrupt, running.pop(worker)[0], how)
    for trial, _ in list(running.values()) + [(t, None) for t in held]:
        quietly(loop.interrupt, trial, how)
    running.clear()
    held.clear()
