"""Many processes on one study (issue 21): peers sharing a PostgreSQL Optuna storage and an MLflow store, each
with its own runs folder and working directory as a separate machine would have, started by the same command.

Real servers only: a throwaway PostgreSQL cluster and `mlflow server` on 127.0.0.1 (tests/servers.py, fixtures in
conftest.py); the peers are real processes (`tests/study_process.py`: studies/run.py with a start barrier). Rows are
the tiny digits rows of tests/study_runner.py (seconds each).
"""
import os
import signal
import time

import optuna
import pytest
import sqlalchemy
from mlflow import MlflowClient
from optuna.trial import TrialState
from study_runner import SECOND_STAGE, start_processes, wait_all, write_digits_study

from sfd import study as studies
from sfd.storelock import advisory_key, advisory_lock
from sfd.study.loop import STALE
from sfd.study.peers import Heartbeats, claim, open_storage, stale_numbers

ROWS = [{"id": f"r{i}", "params": params} for i, params in enumerate([
    {}, {"loss.name": "l2"}, {"student.nfe": 3}, {"student.afs": False}, {"solver.name": "euler"},
    {"loss.name": "l2", "student.nfe": 3}])]


def _trials(name: str, storage: str) -> list:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _running_with_run(name: str, storage: str, row: str, deadline_s: float = 300):
    """The trial of `row` once it runs with its MLflow run created."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        try:
            for t in _trials(name, storage):
                if t.state == TrialState.RUNNING and t.user_attrs.get("row") == row and "mlflow_run_id" in t.user_attrs:
                    return t
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"row {row} never ran")


def _runs(client: MlflowClient, experiment: str) -> tuple:
    """(parent runs, child runs) of an experiment."""
    every = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return ([r for r in every if r.data.tags.get("sfd.role") == "study"],
            [r for r in every if r.data.tags.get("sfd.role") == "trial"])


@pytest.mark.slow
def test_four_peers_started_at_once_on_a_fresh_study_run_each_row_once(tmp_path, postgres):
    """Four peers start the same command at the same moment on new databases (Optuna's and MLflow's schemas both
    created then, with no server in between; artifacts in a shared folder): one trial per row, all COMPLETE (no
    spurious or duplicate trial), one parent run, one FINISHED child per row linked both ways, the rows shared
    out between the peers."""
    storage, tracking = postgres.new_database("four_optuna"), postgres.new_database("four_mlflow")
    shared = tmp_path / "shared-artifacts"
    path = write_digits_study(tmp_path, "four", ROWS)
    args = [str(path), "--storage", storage, "--tracking-uri", tracking, "--no-report"]
    procs = start_processes(tmp_path, [args] * 4, SFD_ARTIFACT_ROOT=str(shared))
    outputs = wait_all(procs)
    assert [p.returncode for p in procs] == [0] * 4, "\n\n".join(outputs)
    trials = _trials("four", storage)
    assert sorted(t.user_attrs["row"] for t in trials) == sorted(r["id"] for r in ROWS)
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    client = MlflowClient(tracking)
    parents, children = _runs(client, "four")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["sfd.row"] for r in children) == sorted(r["id"] for r in ROWS)
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["sfd.trial_number"] == str(t.number) and run.data.metrics["objective"] == t.value
        assert run.info.artifact_uri.startswith(shared.resolve().as_uri())
    assert len({r.data.tags["sfd.pid"] for r in children}) >= 2  # shared out, not run by one peer alone
    assert all("waiting" in out or "trial(s) to run" in out for out in outputs)


@pytest.mark.slow
def test_a_peer_started_while_another_runs_a_trial_leaves_it_alone(tmp_path, postgres):
    """A start is no reason to fail anybody's trial: a peer that starts while another runs a trial claims only
    the rows left, waits for the running one, and the first peer finishes its trial undisturbed."""
    storage = postgres.new_database("alone_optuna")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # both peers on this machine
    rows = [{"id": "long", "params": {"optim.total_kimg": 12.8}}, {"id": "short", "params": {}}]
    path = write_digits_study(tmp_path, "alone", rows)
    args = [str(path), "--storage", storage, "--tracking-uri", tracking, "--no-report", "--n-trials", "1"]
    (first,) = start_processes(tmp_path, [args], barrier=False)
    try:
        long = _running_with_run("alone", storage, "long")
        plan = studies.plan_study(str(path), storage=storage, tracking_uri=tracking)
        assert ("long", "running now, in another process") in [(label, what) for label, what, _ in plan.lines]
        out = studies.run_study(str(path), storage=storage, tracking_uri=tracking, quiet=True, heartbeat_s=2)
    finally:
        output = wait_all([first])[0]
    assert first.returncode == 0, output
    assert out.ran == 1 and not out.failed and out.others_running == 0
    trials = {t.user_attrs["row"]: t for t in _trials("alone", storage)}
    assert len(trials) == 2 and {t.state for t in trials.values()} == {TrialState.COMPLETE}
    assert trials["long"].number == long.number  # the same trial finished by the first peer
    assert MlflowClient(tracking).get_run(long.user_attrs["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_a_peer_killed_mid_trial_is_found_by_its_heartbeat_and_its_row_runs_again(tmp_path, postgres, mlflow_server):
    """SIGKILL the peer running a row: once its heartbeat is older than the grace period (3 × 1 s here) the other
    peer fails its trial as stale, marks its run FAILED, queues the row once more and runs it; the study ends with
    one COMPLETE trial per row, nothing lost, no run left RUNNING."""
    storage = postgres.new_database("killed_optuna")
    rows = [{"id": "victim", "params": {"optim.total_kimg": 12.8}}, {"id": "r2", "params": {}},
            {"id": "r3", "params": {"loss.name": "l2"}}]
    path = write_digits_study(tmp_path, "killed", rows)
    args = [str(path), "--storage", storage, "--tracking-uri", mlflow_server.url, "--no-report", "--heartbeat", "1"]
    procs = start_processes(tmp_path, [args] * 2)
    client = MlflowClient(mlflow_server.url)
    try:
        victim = _running_with_run("killed", storage, "victim")
        pid = int(client.get_run(victim.user_attrs["mlflow_run_id"]).data.tags["sfd.pid"])
        (doomed,) = [p for p in procs if p.pid == pid]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
    finally:
        outputs = wait_all(procs)
    (survivor,) = [p for p in procs if p is not doomed]
    assert doomed.returncode == -signal.SIGKILL and survivor.returncode == 0, "\n\n".join(outputs)
    trials = _trials("killed", storage)
    assert sorted(t.user_attrs["row"] for t in trials if t.state == TrialState.COMPLETE) == ["r2", "r3", "victim"]
    (stale,) = [t for t in trials if t.state != TrialState.COMPLETE]
    assert stale.number == victim.number and stale.state == TrialState.FAIL and stale.user_attrs["interrupted"]
    assert stale.user_attrs["fail_reason"] == STALE.format(grace=3)
    found_after = stale.datetime_complete.timestamp() - killed_at
    print(f"the killed peer's trial was failed as stale {found_after:.1f}s after the kill")  # shown with -s
    assert 2 <= found_after <= 3 + 15, found_after  # not before the grace period, and soon after it
    dead_run = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "FAILED" and dead_run.data.tags["sfd.error"] == STALE.format(grace=3)
    parents, children = _runs(client, "killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.status for r in children) == ["FAILED"] + ["FINISHED"] * 3
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in children)


@pytest.mark.slow
def test_a_second_stage_on_one_peer_trains_from_the_student_another_peer_logged(tmp_path, postgres, mlflow_server):
    """The first stage's student goes through the server (mlflow-artifacts:/), so a peer on another machine (its
    own runs folder and working directory) downloads it for the second stage; no machine keeps artifacts."""
    storage = postgres.new_database("chain_optuna")
    rows = [{"id": "sfd-nfe5", "params": {"student.nfe": 5}}, {"id": "second-stage", "params": SECOND_STAGE}]
    path = write_digits_study(tmp_path, "chain", rows)
    args = [str(path), "--storage", storage, "--tracking-uri", mlflow_server.url, "--no-report"]
    first = start_processes(tmp_path / "a", [[*args, "--n-trials", "1"]], barrier=False)  # the first stage only
    outputs = wait_all(first)
    second = start_processes(tmp_path / "b", [args], barrier=False)
    outputs += wait_all(second)
    assert first[0].returncode == 0 and second[0].returncode == 0, outputs
    trials = {t.user_attrs["row"]: t for t in _trials("chain", storage)}
    assert {t.state for t in trials.values()} == {TrialState.COMPLETE}
    client = MlflowClient(mlflow_server.url)
    one, two = (client.get_run(trials[r].user_attrs["mlflow_run_id"]) for r in ("sfd-nfe5", "second-stage"))
    assert two.data.params["second_stage.first_stage"] == one.info.run_id
    assert one.data.tags["sfd.pid"] != two.data.tags["sfd.pid"]
    assert one.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert list(mlflow_server.artifacts.rglob("student/student.safetensors"))
    for machine in (tmp_path / "a" / "machine0", tmp_path / "b" / "machine0"):
        assert not (machine / "mlruns").exists() and not (machine / "runs" / "artifacts").exists()


@pytest.mark.slow
def test_peers_on_a_search_start_no_more_trials_than_it_asks_for(tmp_path, postgres):
    """A search's new points are queued under the set-up lock after counting, so two peers started at once run
    exactly `n_trials` trials between them (each asking would make one each whenever the queue is empty)."""
    storage = postgres.new_database("search_optuna")
    space = {"loss.name": {"type": "categorical", "choices": ["l1", "l2"]},
             "student.nfe": {"type": "int", "low": 2, "high": 4}}
    path = write_digits_study(tmp_path, "search", None, kind="search", space=space, n_trials=3,
                              sampler={"type": "random", "seed": 0})
    args = [str(path), "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-report"]
    procs = start_processes(tmp_path, [args] * 2)
    outputs = wait_all(procs)
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(outputs)
    trials = _trials("search", storage)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(set(t.params) == set(space) for t in trials)


# ----- the pieces, on the real PostgreSQL ---------------------------------------------------------------------

def test_an_advisory_lock_is_held_by_one_session_at_a_time(postgres):
    url = postgres.new_database("locks")
    engine = sqlalchemy.create_engine(url)
    try_lock = sqlalchemy.text("SELECT pg_try_advisory_lock(:key)")
    key = advisory_key("sfd.study", "s")
    with engine.connect() as other:
        with advisory_lock(url, "sfd.study", "s"):
            assert other.execute(try_lock, {"key": key}).scalar() is False  # held by the lock's own session
            assert other.execute(try_lock, {"key": advisory_key("sfd.study", "t")}).scalar() is True  # another study
        assert other.execute(try_lock, {"key": key}).scalar() is True  # released
    engine.dispose()


def test_claims_pop_the_queue_once_and_never_create_a_trial(postgres):
    """Two storages (as two peers hold) claim from one queue: each queued trial goes to one of them, a claim on an
    empty queue returns None and records nothing; a claimed trial beats, and goes stale once it stops."""
    url = postgres.new_database("claims")
    study_name = "q"
    a, b = open_storage(url, 1), open_storage(url, 1)
    study_a = optuna.create_study(study_name=study_name, storage=a)
    study_b = optuna.load_study(study_name=study_name, storage=b)
    for row in ("x", "y"):
        study_a.enqueue_trial({}, user_attrs={"row": row})
    with Heartbeats(a, 1) as beats_a, Heartbeats(b, 1) as beats_b:
        got = [claim(study_a, a, beats_a, lambda t: True), claim(study_b, b, beats_b, lambda t: True),
               claim(study_a, a, beats_a, lambda t: True), claim(study_b, b, beats_b, lambda t: True)]
        assert [t is not None for t in got] == [True, True, False, False]
        assert {t.user_attrs["row"] for t in got[:2]} == {"x", "y"}
        assert len(study_a.get_trials()) == 2  # nothing created by the empty claims
        assert stale_numbers(study_a, a) == set()
        beats_b.discard(beats_b.trials.copy().pop())  # peer b "dies": its trial stops beating
        time.sleep(4.5)
        assert stale_numbers(study_a, a) == {got[1].number}
