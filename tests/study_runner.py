"""`studies/run.py` is a script, not a package module: tests that call its `main` load it once by path (the study
engine itself is `sfd.study`). Also the tiny digits study that several study tests write (two or three iterations
of batch 16, 16 evaluation samples: seconds per row)."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "studies" / "run.py"
STUDY_PROCESS = ROOT / "tests" / "study_process.py"  # studies/run.py with a start barrier and kill hooks


def load_study_script(module_name: str = "sfd_studies_run"):
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, RUN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


DIGITS_TINY = {"optim.batch_size": 16, "optim.total_kimg": 0.032, "eval.num_samples": 16, "eval.batch_size": 16,
               "eval.gap_nfe": 10, "log.every": 1}
SECOND_STAGE = {"algorithm": "second-stage", "second_stage.first_stage": "row:sfd-nfe5", "solver.name": "euler",
                "solver.m": 2, "student.nfe": 1, "student.afs": True}


def write_digits_study(tmp_path, name, rows, base="experiments/digits_sfd.yaml", kind="comparison", metrics=None,
                       objective="teacher_gap_mean", **extra) -> Path:
    """A study on an embedded digits teacher at the tiny budget (a table study unless `rows` is None and `space`
    is given); returns its YAML path."""
    spec = {"name": name, "kind": kind, "description": "a tiny digits study for tests", "base": str(ROOT / base),
            "overrides": {**DIGITS_TINY, "eval.metrics": metrics or ["teacher_gap"]},
            "objective": {"metric": objective, "direction": "minimize"}, "sampler": {"type": "rows", "seed": 0},
            "rows": rows, **extra}
    spec = {k: v for k, v in spec.items() if v is not None}  # rows=None: a search study
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def runs_by_row(client, out) -> dict:
    """A study outcome's child runs, by their row id."""
    exp = client.get_experiment_by_name(out.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    return {r.data.tags["sfd.row"]: r for r in runs}


def stop_after_ask(monkeypatch, run, at: int = 1) -> None:
    """Call `run()` with SIGTERM (the stop handlers installed, as `run_script` does) arriving right after the
    `at`-th trial is claimed from the study's queue (`sfd.study.peers.claim`, which the trial loop calls), before
    the loop records it; `run` must end Terminated."""
    import os
    import signal

    import pytest

    import sfd.study.loop
    from sfd.signals import Terminated, handle_stop_signals

    real_claim, claimed = sfd.study.loop.claim, []

    def claim_then_stop(*args, **kwargs):
        trial = real_claim(*args, **kwargs)
        if trial is not None:
            claimed.append(trial.number)
            if len(claimed) == at:
                os.kill(os.getpid(), signal.SIGTERM)
        return trial

    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(sfd.study.loop, "claim", claim_then_stop)
        handle_stop_signals(ctrl_c=False)
        try:
            with pytest.raises(Terminated):
                run()
        finally:
            signal.signal(signal.SIGTERM, before)


def stop_next_training(monkeypatch, run) -> None:
    """Call `run()` (a study) with its next training stopped by SIGTERM in this process, as a killed session
    would leave it: that row interrupted, the later rows still queued; `run` must end Terminated."""
    import pytest

    import sfd.runner.run
    from sfd.signals import Terminated

    def stop(*args, **kwargs):
        raise Terminated("stopped by SIGTERM")

    with monkeypatch.context() as patch:
        patch.setattr(sfd.runner.run, "distill", stop)
        with pytest.raises(Terminated):
            run()


def machine_env(machine: Path, **extra) -> dict:
    """The environment of a study process on a "machine" of its own: its runs folder, one torch thread."""
    env = {**os.environ, "SFD_RUNS_DIR": str(machine / "runs"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "OMP_NUM_THREADS": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start_processes(tmp_path: Path, commands: list[list[str]], barrier: bool = True, hooks: tuple = (),
                    same_machine: bool = False, **env) -> list[subprocess.Popen]:
    """One study process per entry of `commands` (tests/study_process.py `hooks` -- studies/run.py arguments), each a
    "machine" of its own (runs folder, working directory) unless `same_machine`, all started at the same moment
    (after their imports) unless `barrier` is False. Their output is piped (stdout and stderr together). Without
    --devices among the arguments a process runs its trials itself (--devices serial; the default, auto, would
    start a worker per core for CPU rows)."""
    gate = tmp_path / "go"
    procs = []
    for i, args in enumerate(commands):
        if "--devices" not in args:
            args = [*args, "--devices", "serial"]
        machine = tmp_path / ("machine" if same_machine else f"machine{i}")
        machine.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(STUDY_PROCESS), *hooks, *(["--barrier", str(gate)] if barrier else []), "--",
               *args]
        procs.append(subprocess.Popen(cmd, cwd=machine, env=machine_env(machine, **env), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    if barrier:
        deadline = time.time() + 300
        while len(list(tmp_path.glob("go.*.ready"))) < len(procs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "a process did not get ready"
            time.sleep(0.1)
        gate.touch()
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Each process's output once it ended (those still running at the timeout are killed)."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs
