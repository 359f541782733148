"""Stopping the scripts (`experiments/run.py`, `studies/run.py`, `reports/build.py`, study workers) on SIGTERM the
way Ctrl-C stops them, and holding a stop back while a tracking write is under way."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable

SIGTERM_EXIT = 128 + signal.SIGTERM  # the shell's status for a process ended by SIGTERM
SIGINT_EXIT = 128 + signal.SIGINT  # ... by Ctrl-C
SIGPIPE_EXIT = 128 + signal.SIGPIPE  # ... by writing to a pipe whose reader has gone (`| head -1`)
CTRL_C = "stopped by SIGINT (Ctrl-C)"


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
        raise KeyboardInterrupt(CTRL_C)
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
    """Run a script's `main()` with SIGTERM turned into `Terminated`; returns its exit status. Ctrl-C and SIGTERM
    end it alike: the runs it had open are ended KILLED as the stop unwinds, then one line on stderr and the
    shell's status for the signal (130, 143), no traceback; neither lands inside a tracking write
    (`stops_deferred`). Output piped to a reader that stops early (`| head -1`) ends it quietly (141)."""
    handle_stop_signals()
    try:
        return main()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated
        print(f"error: {exc or CTRL_C} (any MLflow run it had open is ended KILLED)", file=sys.stderr)
        return SIGTERM_EXIT if isinstance(exc, Terminated) else SIGINT_EXIT
    except BrokenPipeError:
        _discard_stdout()
        return SIGPIPE_EXIT


def _discard_stdout() -> None:
    """Point stdout at /dev/null: the interpreter flushes it on exit, and a flush into the closed pipe would print
    "Exception ignored ... BrokenPipeError" (Python's documented recipe, see the `signal` module's notes on
    SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a file (a test's captured stream): nothing is flushed into the pipe
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
