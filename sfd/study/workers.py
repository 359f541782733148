"""Tracked runs in worker processes, one per device, so that a study's trials can run side by side.

The study process (`sfd.study.devices`) keeps the Optuna study; each `DeviceWorker` is a spawned process that
runs one `Job` at a time (`run_job`, logged to MLflow as the trial's child run) and reports back over a pipe: the
run id as soon as the run exists, its progress while it runs (when the study shows progress), then the outcome.
All Optuna writes stay in the study process; the workers write only their own MLflow runs.

Stopping: a worker ignores SIGINT (Ctrl-C reaches the whole process group) and is stopped by the study
process with one SIGTERM, which unwinds its run the way `sfd.signals.run_script` does (the run ends KILLED). A
worker whose study process died without stopping it (SIGKILL) stops itself the same way within a second.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import threading
import time
from functools import partial
from typing import Iterable

import torch

from sfd.config import RunConfig
from sfd.progress import SentBars
from sfd.runner import resolve_device
from sfd.signals import handle_stop_signals
from sfd.threads import thread_count

from .ddp import RunKilled
from .jobs import Job, run_job

_DEVICE = re.compile(r"^(cpu|cuda:(\d+))$")
AUTO, SERIAL = "auto", "serial"  # --devices words given alone: decide here (auto_devices); this process, in turn
STOP_WAIT_S = 120.0  # how long a stopped worker may take to end its run before it is killed
# Signals that end a process from outside (an operator, a scheduler's preemption, the kernel's OOM killer: SIGKILL);
# any other signal (SIGSEGV, SIGABRT, SIGBUS, ...) is the process's own crash.
OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class DeviceError(ValueError):
    """A `--devices` entry that is not usable here: the message names it and what is allowed."""


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(devices: list[str]) -> list[str]:
    """The worker devices for `--devices`: `all` stands for every CUDA device this process sees; anything this
    machine cannot serve is refused here, before anything is created."""
    if devices == ["all"]:
        count = _cuda_count()
        if not count:
            raise DeviceError(f"--devices all: this process sees no CUDA device{_visible_note()}; name cpu "
                              "entries (e.g. --devices cpu cpu) to run trials side by side on the CPU")
        return [f"cuda:{i}" for i in range(count)]
    if not devices:
        raise DeviceError("--devices: name at least one device (cpu or cuda:<index>), or all")
    bad = [d for d in devices if not _DEVICE.match(d)]
    if bad:
        raise DeviceError(f"--devices: got {', '.join(map(repr, bad))}; each entry is cpu or cuda:<index> "
                          f"(repeat an entry to run several trials on it at once), or give all, {AUTO} or {SERIAL} "
                          "alone")
    indices = [int(m.group(2)) for m in map(_DEVICE.match, devices) if m.group(2) is not None]
    if indices:
        count = _cuda_count()
        missing = sorted({i for i in indices if i >= count})
        if missing:
            raise DeviceError(f"--devices: cuda:{missing[0]} does not exist here (this process sees {count} CUDA "
                              f"device(s){_visible_note()})")
    return list(devices)


def auto_devices(table: bool, configs: Iterable[RunConfig], runs: int) -> list[str] | None:
    """`--devices auto`: a table study whose rows all run on the CPU runs them side by side, one worker per core this
    process may use (over the threads a run takes, times its `ddp` processes: one with `threads: auto`,
    sfd.threads), at most one per run (`runs`); anything else runs one trial at a time in this process (None): a
    search, whose sampler learns from each finished trial before it picks the next, and rows on a GPU, which keep
    the device their configs name."""
    configs = list(configs)
    if not table or not configs or any(resolve_device(c.device).type != "cpu" for c in configs):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_run = max(thread_count(c.threads, torch.device("cpu")) * c.ddp for c in configs)  # a ddp run: ddp processes
    count = min(cores // per_run, runs)
    return ["cpu"] * count if count > 1 else None


def _visible_note() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""


def worker_environment(device: str) -> tuple[str, dict[str, str]]:
    """(the config's `device` in the worker, environment it starts with).

    A GPU worker sees only its card (CUDA_VISIBLE_DEVICES, mapped through the study process's own), so every
    library in it uses that card as `cuda`. A CPU worker's threads are its runs' `threads` setting (one each with
    `auto`, sfd.threads), so workers side by side share the cores without waiting on each other."""
    match = _DEVICE.match(device)
    if match.group(2) is None:
        return "cpu", {}
    index = int(match.group(2))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",")[index].strip() if visible else str(index)
    return "cuda", {"CUDA_VISIBLE_DEVICES": physical}


def _stop_when_orphaned(parent: int, every_s: float = 1.0) -> None:
    """Send this process SIGTERM once the study process is gone (SIGKILL, a crash), so the run in progress ends
    KILLED instead of finishing unseen: the study would run that trial again on its next start."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os.kill(os.getpid(), signal.SIGTERM)


class _StudyGone(KeyboardInterrupt):
    """The study process is gone (its end of the pipe is closed): the run stops as on SIGTERM (ends KILLED)."""


def _send(conn, message: tuple) -> None:
    try:
        conn.send(message)
    except OSError:  # BrokenPipeError: nobody listens any more
        raise _StudyGone("the study process is gone") from None


def _serve(conn) -> None:
    """The worker process: run jobs until told to stop (None) or stopped by SIGTERM. When the study process is
    gone (killed), it ends quietly: no traceback for a pipe nobody reads."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the study process decides when a worker stops
    handle_stop_signals(ctrl_c=False)
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        while True:
            job = conn.recv()
            if job is None:
                return
            try:
                result = run_job(job, on_start=lambda run_id: _send(conn, ("started", run_id)),
                                 progress=SentBars(partial(_send, conn)) if job.progress else None)
            except RunKilled as exc:  # a ddp run stopped from outside: the study process queues it again
                _send(conn, ("killed", str(exc)))
            except Exception as exc:  # noqa: BLE001 - reported to the study process, which fails the trial
                _send(conn, ("failed", f"{type(exc).__name__}: {exc}"))
            else:
                _send(conn, ("done", list(result.objective), dict(result.metrics)))
    except _StudyGone:
        pass
    except KeyboardInterrupt as exc:  # SIGTERM (Terminated): the run, if any, has ended KILLED
        try:
            conn.send(("interrupted", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    except EOFError:  # the study process is gone
        pass


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """`env` in this process's environment for the block, then as it was. A process spawned inside the block
    starts with it, so its CUDA_VISIBLE_DEVICES is in place before it imports anything
    (spawn re-imports the study script, and with it torch, before the worker's own code runs)."""
    before = {key: os.environ[key] for key in env if key in os.environ}
    os.environ.update(env)
    try:
        yield
    finally:
        for key in env:
            os.environ.pop(key)
        os.environ.update(before)


class DeviceWorker:
    """One spawned process serving one device; started on first use and again after it dies."""

    def __init__(self, device: str):
        self.device = device
        self.config_device, self.env = worker_environment(device)
        self.process = None
        self.conn = None

    def submit(self, job: Job) -> None:
        if self.process is None or not self.process.is_alive():
            self._start()
        try:
            self.conn.send(job)
        except OSError:  # it ended between the check and the send: start a fresh one
            self.retire()
            self._start()
            self.conn.send(job)

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no forked CUDA state, no inherited MLflow clients
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), name=f"sfd-worker-{self.device}")
        with _environment(self.env):
            self.process.start()
        child.close()

    def receive(self) -> tuple:
        """The next message; ("died", reason, signal number or None) if the process ended without one."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=10)
            code = self.process.exitcode
            signum = -code if code is not None and code < 0 else None
            how = f"killed by signal {signum} ({signal_name(signum)})" if signum else f"exit code {code}"
            self.retire()
            return ("died", f"WorkerDied: the worker process on {self.device} ended ({how}) during the trial", signum)

    def retire(self, timeout: float = 30.0) -> None:
        """Forget a process that is ending (it reported it was stopped): the next job starts a fresh one."""
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
            self.conn.close()
        self.process = None

    def interrupt(self) -> None:
        """Ask a busy worker to stop its run (it ends KILLED) and exit."""
        if self.process is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGTERM)

    def close(self, timeout: float = 10.0) -> None:
        """End the process: politely if idle, else kill it once `timeout` has passed."""
        if self.process is not None and self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.retire(timeout)


