"""A trial whose config has `ddp: N` (N > 1) runs on N processes: `experiments/run.py` as a child process, which
relaunches itself under `torchrun --nproc-per-node N` (sfd.distributed). Rank 0 alone logs the trial's MLflow run
(the study's child run, with the trial's tags and objective) and writes the run's outcome file
(sfd.runner.outcome); this module reads it back as the trial's result:

- FINISHED: a `RunResult` with the run's metrics and objective (the trial completes with it);
- FAILED or INVALID: `RunFailed` with the run's reason (the trial fails with it);
- KILLED by anyone but this process (an operator, a scheduler): `RunKilled`, an interruption (the row is queued
  again, `TrialLoop.killed`);
- no outcome past RUNNING (a rank or torchrun died without ending the run): the run is ended FAILED and the
  trial fails with torchrun's last lines.

Stops. Ctrl-C or SIGTERM here sends torchrun SIGTERM, which stops every rank (their run ends KILLED), waits for it
(killing what is left after `STOP_WAIT_S`) and goes on up as the stop it is. Should this process die without a
word (SIGKILL), Linux sends torchrun SIGTERM (`sfd.distributed.stop_with_parent`), so no rank is left behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from sfd.config import dump_yaml
from sfd.distributed import PARENT_ENV
from sfd.runner import RunResult, read_outcome
from sfd.tracking import get_client, mark_failed, project_root

STOP_WAIT_S = 120.0  # how long torchrun may take to stop its ranks (it kills them itself after 30 s)
POLL_S = 0.5  # how often the outcome file is read while the run goes on
TAIL_LINES = 12  # torchrun's last lines kept in a failure's reason


class RunFailed(RuntimeError):
    """The DDP run failed; the message is the run's own reason."""


class RunKilled(RuntimeError):
    """The DDP run was stopped by a signal from outside this process."""


def run_script() -> Path:
    """The checkout's `experiments/run.py` (the script torchrun runs on every rank)."""
    script = project_root() / "experiments" / "run.py"
    if not script.is_file():
        raise RunFailed(f"a ddp run needs {script} (torchrun runs that script on every rank); run the study from "
                        "a checkout of the project")
    return script


def ddp_command(job: Any, folder: Path) -> list[str]:
    """The command line that runs `job` (a `jobs.Job`) as the study's child run, its config in `folder`."""
    config = folder / "config.yaml"
    config.write_text(dump_yaml(job.cfg))
    cmd = [sys.executable, str(run_script()), str(config), "--experiment", job.experiment,
           "--tracking-uri", job.tracking_uri, "--result-file", str(folder / "outcome.json"), "--quiet"]
    if job.parent_run_id:
        cmd += ["--parent-run-id", job.parent_run_id]
    for key, value in job.tags.items():
        cmd += ["--tag", f"{key}={value}"]
    for metric in job.objective:
        cmd += ["--objective", metric]
    if job.smoke:
        cmd.append("--smoke")
    if job.save_student:
        cmd.append("--save-student")
    return cmd


def run_ddp_job(job: Any, on_start: Callable[[str], None] | None = None) -> RunResult:
    """Run `job` (`job.cfg.ddp` > 1) under torchrun and return its result, or raise `RunFailed` / `RunKilled`
    (see the module docstring). `on_start(run_id)` is called once the run exists."""
    with tempfile.TemporaryDirectory(prefix="sfd-ddp-") as tmp:
        folder = Path(tmp)
        cmd = ddp_command(job, folder)
        log_path = folder / "output.log"
        with open(log_path, "wb") as log:
            # its own session: a Ctrl-C at the terminal reaches this process alone, which stops torchrun itself
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, PARENT_ENV: str(os.getpid())})
            outcome = _wait(proc, folder / "outcome.json", on_start)
        return _result(job, outcome, proc.returncode, log_path)


def _wait(proc: subprocess.Popen, outcome_path: Path, on_start: Callable[[str], None] | None) -> dict | None:
    """Wait for the run to end, telling `on_start` its run id as soon as the outcome file has one; on a stop, stop
    torchrun first. Returns the last outcome written (None if none was)."""
    told = False
    try:
        while True:
            ended = proc.poll() is not None
            outcome = read_outcome(outcome_path) if outcome_path.exists() else None
            if outcome and outcome["run_id"] and not told and on_start is not None:
                on_start(outcome["run_id"])
                told = True
            if ended:
                return outcome
            time.sleep(POLL_S)
    except BaseException:  # Ctrl-C, SIGTERM, or an error here: no rank may outlive this trial
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    """Stop torchrun and its ranks: SIGTERM (torchrun passes it on; the ranks end their run KILLED), then, past
    STOP_WAIT_S, SIGKILL to whatever of them is left."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=STOP_WAIT_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _result(job: Any, outcome: dict | None, returncode: int, log_path: Path) -> RunResult:
    status = outcome["status"] if outcome else None
    if status == "FINISHED":
        return RunResult(outcome["run_id"], status, dict(outcome["metrics"]), job.cfg, list(outcome["objective"]))
    if status in ("FAILED", "INVALID"):
        raise RunFailed(outcome["error"] or f"the run ended {status} (exit status {returncode})")
    if status == "KILLED":
        raise RunKilled(f"its ddp run was stopped from outside ({outcome['error'] or 'a signal'})")
    tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-TAIL_LINES:])
    reason = f"the run's processes ended (exit status {returncode}) without ending the run: {tail}"
    if outcome and outcome["run_id"]:  # left RUNNING by a rank that died: end it with the reason
        mark_failed(get_client(job.tracking_uri), outcome["run_id"], reason)
    raise RunFailed(reason)
