"""Stopping the scripts (`experiments/run.py`, `studies/run.py`, study workers) on SIGTERM the way Ctrl-C stops
them, and holding a stop back while a tracking write is under way."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable

SIGTERM_EXIT = 128 + signal.SIGTERM  # the shell's status for a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a batch scheduler), raised in the main thread. A KeyboardInterrupt, so it
    unwinds exactly like Ctrl-C: the MLflow run ends KILLED, Optuna fails the trial, the study run ends KILLED."""


_held: list[int] = []  # stop signals that arrived inside `stops_deferred`, acted on when it ends
_deferring = 0


def _raise_terminated(signum, frame) -> None:
    """The SIGTERM handler (also SIGINT's, under `run_script`)."""
    if _deferring:
        _held.append(signum)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM kills at once, should the cleanup hang
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def stops_deferred():
    """Act on a SIGTERM (or, under `run_script`, a Ctrl-C) that arrives inside the block only once the block is
    done. Tracking writes run inside it: a stop raised in the middle of a sqlite write leaves the store locked,
    and the cleanup that would end the run KILLED then fails with "database is locked"."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():  # handlers run in the main thread only
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _held:
            signum = _held[0]
            _held.clear()
            _raise_terminated(signum, None)


def handle_stop_signals(ctrl_c: bool = True) -> None:
    """From now on SIGTERM raises `Terminated` in this process (and Ctrl-C KeyboardInterrupt, if `ctrl_c`), and
    either is held back inside `stops_deferred`. Call it from the main thread."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    if ctrl_c:
        signal.signal(signal.SIGINT, _raise_terminated)


def run_script(main: Callable[[], int]) -> int:
    """Run a script's `main()` with SIGTERM turned into `Terminated`; returns its exit status (143 if it was
    terminated, after the runs it had open were ended). Ctrl-C still raises KeyboardInterrupt, but neither lands
    inside a tracking write (`stops_deferred`)."""
    handle_stop_signals()
    try:
        return main()
    except Terminated as exc:
        print(f"error: {exc} (any MLflow run it had open is ended KILLED)", file=sys.stderr)
        return SIGTERM_EXIT
