"""Issue 18's concurrency and kill cases on one machine (sqlite stores), with real processes: the study lock cannot
be sidestepped by spelling the storage differently and a refused process writes nothing; studies started at once
on a new runs folder share its stores; a kill at a named moment of a trial, then a rerun, loses nothing and redoes
nothing that had finished; a run left RUNNING by `kill -9` is marked FAILED by the next start on its host.

The kills land at their moments through tests/study_process.py (`--kill-at`: SIGKILL of the study process patched
in at that point of the trial loop); the studies are the tiny digits studies of tests/study_runner.py.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from study_runner import ROOT, load_study_script, machine_env, start_processes, wait_all, write_digits_study

from sfd import study as studies
from sfd import tracking as T
from sfd.storelock import sqlite_lock_path, store_identity, without_password

script = load_study_script("sfd_studies_run_faults")
ROWS = [{"id": "first", "params": {}}, {"id": "second", "params": {"loss.name": "l2"}}]


def _trials(name: str, runs: Path) -> list:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'optuna.db'}").get_trials()


def _children(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sfd.role") == "trial"]


def _nothing_lost_nothing_redone(name: str, runs: Path, rows: list[dict]) -> list:
    """Exactly one COMPLETE trial per row; no run left RUNNING; every FINISHED run is its row's COMPLETE trial's
    (counted once); every run is linked from the trial it was created for (no orphan). Returns the trials."""
    trials = _trials(name, runs)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["row"] for t in complete) == sorted(r["id"] for r in rows)
    children = _children(MlflowClient(f"sqlite:///{runs / 'mlflow.db'}"), name)
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert sorted(r.info.run_id for r in children if r.info.status == "FINISHED") == sorted(
        t.user_attrs["mlflow_run_id"] for t in complete)
    by_number = {t.number: t for t in trials}
    for run in children:
        assert by_number[int(run.data.tags["sfd.trial_number"])].user_attrs["mlflow_run_id"] == run.info.run_id
    return trials


# ----- concurrency --------------------------------------------------------------------------------------------

def test_one_store_spelled_another_way_names_the_same_lock(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    spellings = [f"sqlite:///{tmp_path}/runs/optuna.db", f"sqlite:///{tmp_path}/runs/./optuna.db",
                 f"sqlite:///{tmp_path}/link/../runs/optuna.db", f"sqlite:///{tmp_path}/link/optuna.db",
                 "sqlite:///runs/optuna.db", f"sqlite:///{tmp_path}//runs/optuna.db?timeout=30"]
    assert len({sqlite_lock_path(url, "study") for url in spellings}) == 1
    assert len({store_identity(url) for url in spellings}) == 1
    assert sqlite_lock_path(spellings[0], "study") != sqlite_lock_path(spellings[0], "other")
    assert without_password("postgresql://me:secret@db:5432/optuna") == "postgresql://me@db:5432/optuna"
    assert store_identity("postgresql://me:secret@db/optuna") == "postgresql://me@db/optuna"


@pytest.mark.slow
def test_the_study_lock_holds_however_the_storage_is_spelled_and_a_refused_process_writes_nothing(
        tmp_path, monkeypatch, capsys):
    """While a study runs (a real process), the same study named through `./`, a symlink or a relative path is
    refused before it writes anything: the running study's `--seeds` YAML and locks stay as they were, and the
    running study ends with its trials complete under one parent run."""
    machine = tmp_path / "machine"
    runs = machine / "runs"
    path = write_digits_study(tmp_path, "spelled", [{"id": "long", "params": {"optim.total_kimg": 12.8}}])
    (running,) = start_processes(tmp_path, [[str(path), "--seeds", "0", "1", "--no-report"]], barrier=False,
                                 same_machine=True)
    try:
        deadline = time.time() + 300
        while not _live(runs, "spelled-seeds-0-1"):
            assert time.time() < deadline and running.poll() is None, "the study never ran"
            time.sleep(0.3)
        seeds_yaml = runs / "studies" / "spelled-seeds-0-1.yaml"
        before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in [seeds_yaml, *(runs / ".locks").iterdir()]}
        (tmp_path / "link").symlink_to(runs)
        monkeypatch.chdir(machine)
        monkeypatch.setenv("SFD_RUNS_DIR", str(runs))
        for storage in (f"sqlite:///{runs}/./optuna.db", f"sqlite:///{tmp_path}/link/optuna.db",
                        "sqlite:///runs/optuna.db"):
            code = script.main([str(path), "--seeds", "0", "1", "--storage", storage, "--no-report"])
            assert code == 2
            assert f"is already being run by process {running.pid}" in capsys.readouterr().err
        assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before} == before
        assert sorted((runs / ".locks").iterdir()) == sorted(p for p in before if p != seeds_yaml)
    finally:
        output = wait_all([running])[0]
    assert running.returncode == 0, output
    trials = _trials("spelled-seeds-0-1", runs)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    every = client.search_runs([client.get_experiment_by_name("spelled-seeds-0-1").experiment_id])
    assert sorted(r.data.tags["sfd.role"] for r in every) == ["study", "trial", "trial"]


def _live(runs: Path, name: str) -> bool:
    """A trial of the study runs with its MLflow run created."""
    if not (runs / "optuna.db").exists():
        return False
    try:
        trials = _trials(name, runs)
    except Exception:  # noqa: BLE001 - not created yet (KeyError), or its tables are being created
        return False
    return any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials)


@pytest.mark.slow
def test_studies_started_at_once_on_a_new_runs_folder_share_its_stores(tmp_path):
    """Three studies start at the same moment on a runs folder that does not exist yet: MLflow's and Optuna's
    schemas are created once (they used to crash in the migration, or leave the store half-migrated), and every
    study ends complete with its own parent run."""
    names = ["one", "two", "three"]
    paths = [write_digits_study(tmp_path, name, ROWS[:1]) for name in names]
    procs = start_processes(tmp_path, [[str(p), "--no-report"] for p in paths], SFD_RUNS_DIR=str(tmp_path / "shared"))
    outputs = wait_all(procs)
    assert [p.returncode for p in procs] == [0, 0, 0], "\n\n".join(outputs)
    runs = tmp_path / "shared"
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    for name in names:
        assert [t.state for t in _trials(name, runs)] == [TrialState.COMPLETE]
        every = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert sorted(r.data.tags["sfd.role"] for r in every) == ["study", "trial"]
        assert {r.info.status for r in every} == {"FINISHED"}


def test_one_study_name_in_two_optuna_storages_has_two_parent_runs(tmp_path, stores):
    """Two Optuna storages, one MLflow store: each study gets its own parent run (kept in its user attributes,
    never found by name), its own children, and its report reads its own runs."""
    from reports.loading import load_study_data

    path = write_digits_study(tmp_path, "twin", ROWS[:1])
    tracking = f"sqlite:///{stores / 'mlflow.db'}"
    a, b = (studies.run_study(str(path), quiet=True, tracking_uri=tracking,
                              storage=f"sqlite:///{tmp_path / where / 'optuna.db'}") for where in ("a", "b"))
    assert a.parent_run_id != b.parent_run_id
    client = MlflowClient(tracking)
    for out in (a, b):
        (child,) = [r for r in _children(client, "twin") if r.data.tags["mlflow.parentRunId"] == out.parent_run_id]
        trial = out.study.trials[0]
        assert child.info.run_id == trial.user_attrs["mlflow_run_id"]
        data = load_study_data("twin", storage=out.storage, tracking_uri=tracking, spec=str(path))
        assert data.parent["run_id"] == out.parent_run_id and list(data.runs["run_id"]) == [child.info.run_id]
    again = studies.run_study(str(path), quiet=True, tracking_uri=tracking, storage=a.storage)
    assert again.parent_run_id == a.parent_run_id and again.ran == 0


# ----- kills --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("moment, devices", [("run-created", None), ("run-finished", None), ("worker-done", ["cpu"])])
def test_a_kill_at_a_named_moment_then_a_rerun_loses_nothing_and_redoes_nothing(tmp_path, stores, moment, devices):
    """SIGKILL of the study process right after a trial's run is created (before the trial records it), right
    after the run ended FINISHED (before Optuna is told), or while a --devices worker reports its finished run;
    then the same command again: one COMPLETE trial per row, no run left RUNNING, every FINISHED run counted once,
    no orphan run, and a run that had finished is adopted, not trained again."""
    path = write_digits_study(tmp_path, "killed", ROWS)
    args = [str(path), "--no-report", *(["--devices", *devices] if devices else [])]
    (killed,) = start_processes(tmp_path, [args], barrier=False, hooks=("--kill-at", moment), same_machine=True,
                                SFD_RUNS_DIR=str(stores))
    output = wait_all([killed])[0]
    assert killed.returncode == -signal.SIGKILL, output
    assert "Traceback" not in output, output  # no worker's BrokenPipeError
    (dead,) = _trials("killed", stores)[:1]
    assert dead.state == TrialState.RUNNING and ("mlflow_run_id" in dead.user_attrs) == (moment != "run-created")
    time.sleep(2)  # a --devices worker notices its study process is gone within a second, and ends
    out = studies.run_study(str(path), quiet=True, devices=devices)
    trials = _nothing_lost_nothing_redone("killed", stores, ROWS)
    first = trials[0]
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    if moment == "run-created":  # nothing had finished: the row is trained again, its run linked and FAILED
        assert first.state == TrialState.FAIL and first.user_attrs["interrupted"] is True
        run = client.get_run(first.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["sfd.error"].startswith("interrupted")
        assert out.ran == 2 and len(trials) == 3
    else:  # the finished run is adopted by its own trial: the row is not trained again
        assert first.state == TrialState.COMPLETE and len(trials) == 2 and out.ran == 2
        assert len(_children(client, "killed")) == 2
        assert first.value == client.get_run(first.user_attrs["mlflow_run_id"]).data.metrics["objective"]


@pytest.mark.slow
def test_kill_9_of_a_standalone_run_is_marked_failed_by_the_next_run_on_its_host(tmp_path, stores):
    """experiments/run.py records its host and pid on its run; killed by SIGKILL, it cannot end the run, and the
    next experiments/run.py on that host marks it FAILED saying its process is gone."""
    run_py = ROOT / "experiments" / "run.py"
    config = ROOT / "experiments" / "digits_sfd.yaml"
    tiny = ["optim.batch_size=16", "eval.num_samples=16", "eval.batch_size=16", "eval.gap_nfe=10",
            "eval.metrics=[teacher_gap]"]
    env = machine_env(stores.parent)
    proc = subprocess.Popen([sys.executable, str(run_py), str(config), *tiny, "optim.total_kimg=25.6"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    try:
        deadline, running = time.time() + 300, []
        while not running:
            assert time.time() < deadline and proc.poll() is None, "the run never started"
            time.sleep(0.3)
            exp = (stores / "mlflow.db").exists() and client.get_experiment_by_name("experiments")
            running = exp and client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (left,) = running
    assert left.data.tags["sfd.pid"] == str(proc.pid) and client.get_run(left.info.run_id).info.status == "RUNNING"
    done = subprocess.run([sys.executable, str(run_py), str(config), *tiny, "optim.total_kimg=0.032"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"note: run {left.info.run_id} was left RUNNING by a process of this host that is gone" in done.stdout
    dead = client.get_run(left.info.run_id)
    assert dead.info.status == "FAILED"
    assert dead.data.tags["sfd.error"].startswith(f"interrupted: its process is gone (pid {proc.pid} on ")


# ----- stores that a study cannot use -----------------------------------------------------------------------

def test_a_database_tracking_store_without_a_server_needs_a_shared_artifact_root(tmp_path, monkeypatch):
    """With a PostgreSQL MLflow store and no server, artifacts would go to <cwd>/mlruns of whichever machine
    created the experiment: refused unless SFD_ARTIFACT_ROOT names a shared place, which experiments then use."""
    monkeypatch.delenv(T.ARTIFACT_ROOT_ENV, raising=False)
    assert T.ARTIFACT_ROOT_ENV in T.tracking_uri_problem("postgresql://me@db/mlflow")
    monkeypatch.setenv(T.ARTIFACT_ROOT_ENV, str(tmp_path / "shared"))
    assert T.tracking_uri_problem("postgresql://me@db/mlflow") is None
    assert T.artifact_location("postgresql://me@db/mlflow", "exp") == (tmp_path / "shared" / "exp").as_uri()
    monkeypatch.setenv(T.ARTIFACT_ROOT_ENV, "s3://bucket/sfd/")
    assert T.artifact_location("sqlite:///x.db", "exp") == "s3://bucket/sfd/exp"
    assert T.artifact_location("http://127.0.0.1:5000", "exp") is None  # the server decides


def test_a_store_that_does_not_answer_is_refused_before_anything_is_created(tmp_path, stores):
    from servers import free_port

    path = write_digits_study(tmp_path, "unreachable", ROWS[:1])
    port = free_port()
    for option, what in ((dict(tracking_uri=f"http://127.0.0.1:{port}"), "no MLflow server answers at"),
                         (dict(storage=f"postgresql://me:secret@127.0.0.1:{port}/optuna"),
                          f"cannot connect to postgresql://me@127.0.0.1:{port}/optuna")):
        with pytest.raises(studies.StudyError, match=what) as err:
            studies.run_study(str(path), quiet=True, **option)
        assert "secret" not in str(err.value)
    assert not stores.exists()
