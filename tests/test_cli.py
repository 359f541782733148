import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sfd.cli import main
from sfd.signals import SIGINT_EXIT, SIGPIPE_EXIT, SIGTERM_EXIT, Terminated, run_script, stops_deferred
from sfd.tracking import RunLogger, get_client

ROOT = Path(__file__).resolve().parents[1]


def test_dispatches_to_assets_and_rejects_unknown(capsys):
    assert main(["assets", "list"]) == 0
    assert "edm-cifar10-32x32-uncond-vp" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main([]) == 2


def test_sigterm_is_a_keyboard_interrupt_and_exits_143(capsys):
    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return 0

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert run_script(terminated) == SIGTERM_EXIT == 143
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert issubclass(Terminated, KeyboardInterrupt)  # so it unwinds exactly like Ctrl-C
    assert "stopped by SIGTERM" in capsys.readouterr().err


@pytest.mark.parametrize("signum,status,why", [
    (signal.SIGTERM, SIGTERM_EXIT, "Terminated: stopped by SIGTERM"),
    (signal.SIGINT, SIGINT_EXIT, "KeyboardInterrupt: stopped by SIGINT (Ctrl-C)"),
], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_end_a_lone_run_killed_alike(tmp_path, signum, status, why):
    """`timeout` / `kill` send SIGTERM: the run must end KILLED with an end time, as Ctrl-C ends it, not stay
    RUNNING forever (a study rerun repairs its own trials; nothing repairs a lone run). Either stop ends the
    script with one line on stderr, no traceback (Ctrl-C printed a 40-line one), and the shell's status."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    client.search_experiments()  # create the store's schema here: polling a store being created races
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "MLFLOW_DISABLE_TELEMETRY": "true",
           "SFD_RUNS_DIR": str(tmp_path / "runs")}
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), str(ROOT / "experiments" / "gmm_sfd.yaml"),
           "optim.total_kimg=100"]  # minutes of training: still running when it is stopped
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id, deadline = None, time.time() + 60
    try:
        while run_id is None and time.time() < deadline:
            time.sleep(0.5)
            assert proc.poll() is None, proc.communicate()
            exp = client.get_experiment_by_name("experiments")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            run_id = next((r.info.run_id for r in runs if r.info.status == "RUNNING"), None)
        assert run_id is not None, "the run did not start"
        time.sleep(1.0)  # into the training loop
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    stopped = why.split(": ", 1)[1]
    assert err.splitlines() == [f"error: {stopped} (any MLflow run it had open is ended KILLED)"], err
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert run.data.tags["sfd.error"] == why


def _signal_inside(signum: int, done: list):
    """A stand-in for a sqlite write that a stop signal lands in: the signal arrives, then the write finishes."""
    def write(*args):
        os.kill(os.getpid(), signum)
        time.sleep(0.2)  # the handler has run by now, were it not deferred
        done.append(args)
        return "written"

    return write


def test_a_stop_waits_for_the_tracking_call_it_lands_in(tmp_path):
    """A SIGTERM (or, in a script, Ctrl-C) inside an MLflow call is acted on once the call has returned: raised
    in the middle of a sqlite write it left the store locked for the cleanup that ends the run KILLED."""
    client = get_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    done: list = []
    client._client.set_tag = _signal_inside(signal.SIGTERM, done)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        from sfd.signals import _raise_terminated

        signal.signal(signal.SIGTERM, _raise_terminated)
        with pytest.raises(Terminated, match="stopped by SIGTERM"):
            client.set_tag("run", "key", "value")
        assert done == [("run", "key", "value")]

        def ctrl_c_in_a_write() -> int:
            with stops_deferred():
                _signal_inside(signal.SIGINT, done)("second")
            return 0  # not reached: the held Ctrl-C is raised as the block ends

        assert run_script(ctrl_c_in_a_write) == SIGINT_EXIT  # the held Ctrl-C ended it: one line, no traceback
        assert done[-1] == ("second",)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_a_run_that_cannot_be_ended_still_raises_the_stop(capsys):
    class LockedStore:
        def __getattr__(self, name):
            def locked(*args, **kwargs):
                raise RuntimeError("database is locked")
            return locked

    with pytest.raises(Terminated):  # not the store's RuntimeError
        with RunLogger(LockedStore(), "run-1"):
            raise Terminated("stopped by SIGTERM")
    assert "could not end MLflow run run-1 (RuntimeError: database is locked)" in capsys.readouterr().err


def test_a_tracking_call_in_another_thread_does_not_hold_the_main_threads_stop():
    """Signal handlers run in the main thread: a block entered by another thread must not defer them (the held
    stop would be raised in that thread, and the main thread would never stop)."""
    import threading

    from sfd.signals import _raise_terminated

    inside, release = threading.Event(), threading.Event()

    def tracking_call():
        with stops_deferred():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=tracking_call)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_terminated)
    thread.start()
    try:
        assert inside.wait(10)
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)  # the handler raises before this ends
    finally:
        release.set()
        thread.join(10)
        signal.signal(signal.SIGTERM, previous)


def test_output_piped_to_a_reader_that_stops_early_ends_quietly():
    """`studies/run.py --list | head -1`: the reader closes the pipe after one line; the next write fails with
    BrokenPipeError, which ended the script with a traceback and "Exception ignored ... BrokenPipeError" at exit."""
    proc = subprocess.run(f"{sys.executable} {ROOT / 'studies' / 'run.py'} --list | head -1; "
                          "echo \"status ${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] in {p.stem for p in (ROOT / "studies").glob("*.yaml")}, proc
    assert lines[1] == f"status {SIGPIPE_EXIT}", proc  # as a command SIGPIPE ended
    assert proc.stderr == "", proc.stderr

