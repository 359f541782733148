"""`studies/run.py` as a test's subprocess, with two test-only hooks:

    python tests/study_process.py [--barrier FILE] [--kill-at MOMENT] -- <studies/run.py arguments>

--barrier FILE   import everything, touch FILE.<pid>.ready, then wait until FILE exists before the study starts, so
                 that several processes start the same study at the same moment (their imports take seconds).
--kill-at MOMENT SIGKILL this process at a named moment of a trial, as a crash or `kill -9` would land there:
    run-created    right after a trial's MLflow run is created, before the trial records the run's id
    run-finished   right after a trial's run ended FINISHED, before Optuna is told (serial)
    worker-done    right after a --devices worker reported its finished run, before Optuna is told
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_runner import load_study_script  # noqa: E402

import sfd.study.devices  # noqa: E402
import sfd.study.serial  # noqa: E402
from sfd.signals import run_script  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(moment: str) -> None:
    real_run_job, real_take = sfd.study.serial.run_job, sfd.study.devices._take

    def run_job_killed_at_start(job, on_start=None, **kwargs):
        return real_run_job(job, on_start=lambda run_id: die(), **kwargs)

    def run_job_killed_at_end(job, on_start=None, **kwargs):
        real_run_job(job, on_start=on_start, **kwargs)
        die()

    def take_killed_when_done(loop, worker, message, running, *board):
        if message[0] == "done":
            die()
        return real_take(loop, worker, message, running, *board)

    if moment == "run-created":
        sfd.study.serial.run_job = run_job_killed_at_start
    elif moment == "run-finished":
        sfd.study.serial.run_job = run_job_killed_at_end
    elif moment == "worker-done":
        sfd.study.devices._take = take_killed_when_done
    else:
        raise SystemExit(f"--kill-at: unknown moment {moment!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--barrier", type=Path)
    parser.add_argument("--kill-at")
    parser.add_argument("study_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    study_args = args.study_args[1:] if args.study_args[:1] == ["--"] else args.study_args
    script = load_study_script()
    if args.kill_at:
        kill_at(args.kill_at)
    if args.barrier:
        Path(f"{args.barrier}.{os.getpid()}.ready").touch()
        while not args.barrier.exists():
            time.sleep(0.01)
    return run_script(lambda: script.main(study_args))


if __name__ == "__main__":
    sys.exit(main())
