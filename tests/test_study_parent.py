"""What a study's MLflow experiment and parent run show (issue 22): child runs named by their row, the study's
settings as params, the best row's objective as a metric, a description from what was measured, the experiment's
kind, description and primary metric, and a parent status that follows the study's trials."""
import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState, create_trial

import sfd.study.run
import sfd.study.serial
from sfd import study as studies
from sfd.study.parent import parent_status, register_best

ROOT = Path(__file__).resolve().parents[1]
GMM = ROOT / "experiments" / "gmm_sfd.yaml"
TINY = {"teacher.name": "gmm-img-4", "optim.batch_size": 16, "optim.total_kimg": 0.048, "eval.num_samples": 16,
        "eval.gap_nfe": 10}
ROWS = [{"id": "sfd-l1", "params": {"loss.name": "l1"}},
        {"id": "sfd-l2", "params": {"loss.name": "l2"}}]


def _study(tmp_path, name="life", rows=ROWS) -> Path:
    spec = {"name": name, "kind": "ablation", "description": "A tiny GMM study for tests.", "base": str(GMM),
            "overrides": TINY, "objective": {"metric": "teacher_gap_mean", "direction": "minimize"},
            "sampler": {"type": "rows", "seed": 0}, "rows": rows}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _trial(state: TrialState, value: float | None = None):
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                        params={}, distributions={})


@pytest.mark.parametrize("states, stopped, error, expected", [
    ([TrialState.COMPLETE, TrialState.WAITING], False, False, "RUNNING"),  # rows still queued (--n-trials)
    ([TrialState.COMPLETE, TrialState.RUNNING], True, False, "RUNNING"),  # another process still runs a trial
    ([TrialState.COMPLETE, TrialState.FAIL], False, False, "FINISHED"),  # a failed row: the study still finished
    ([TrialState.FAIL, TrialState.FAIL], False, False, "FAILED"),  # nothing finished
    ([TrialState.COMPLETE, TrialState.WAITING], True, False, "KILLED"),  # stopped with rows queued
    ([TrialState.COMPLETE], False, True, "FAILED"),  # the invocation ended on an error
    ([TrialState.COMPLETE, TrialState.COMPLETE], False, False, "FINISHED"),
])
def test_parent_status_follows_the_trials(states, stopped, error, expected):
    trials = [_trial(s, 1.0) for s in states]
    assert parent_status(trials, stopped=stopped, error=error) == expected


def test_parent_run_and_experiment_over_a_studys_life(tmp_path, stores, monkeypatch):
    """RUNNING while a trial runs and while rows are queued; FINISHED once none are; child runs named by row; the
    study's settings and best row on the parent; the experiment opens its runs with `objective` as its metric."""
    path = _study(tmp_path)
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    seen = []
    real_run_job = sfd.study.serial.run_job

    def run_job(job, **kwargs):  # the parent's status while the trial runs
        seen.append(client.get_run(job.parent_run_id).info.status)
        return real_run_job(job, **kwargs)

    monkeypatch.setattr(sfd.study.serial, "run_job", run_job)
    first = studies.run_study(str(path), quiet=True, n_trials=1)
    parent = client.get_run(first.parent_run_id)
    assert seen == ["RUNNING"] and first.ran == 1
    assert parent.info.status == "RUNNING" and not parent.info.end_time  # row sfd-l2 is still queued
    assert "1 complete, 1 waiting" in parent.data.tags["mlflow.note.content"]

    second = studies.run_study(str(path), quiet=True)
    parent = client.get_run(second.parent_run_id)
    assert seen == ["RUNNING", "RUNNING"] and parent.info.status == "FINISHED" and parent.info.end_time

    trials = optuna.load_study(study_name="life", storage=second.storage).get_trials()
    best = min(trials, key=lambda t: t.value)
    assert parent.data.metrics["best/teacher_gap_mean"] == best.value
    assert parent.data.tags["sfd.best_row"] == best.user_attrs["row"]
    assert parent.data.tags["sfd.best_run_id"] == best.user_attrs["mlflow_run_id"]
    version = client.get_model_version_by_alias("life", "best")  # the best row's student, registered
    (output,) = client.get_run(best.user_attrs["mlflow_run_id"]).outputs.model_outputs
    assert version.run_id == best.user_attrs["mlflow_run_id"]
    model = client.get_logged_model(output.model_id)
    assert version.source == model.artifact_location
    assert {"name": "life", "version": str(version.version)} in json.loads(model.tags["mlflow.modelVersions"])  # UI
    versions = len(client.search_model_versions("name = 'life'"))
    assert register_best(client, "life", version.run_id) == int(version.version)  # the same best: no new version
    assert len(client.search_model_versions("name = 'life'")) == versions
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("A tiny GMM study for tests.") and "2 complete" in note and "few minutes" not in note
    params = parent.data.params
    assert params["study.name"] == "life" and params["study.objective"] == "teacher_gap_mean"
    assert params["study.directions"] == "minimize" and params["study.rows"] == "2" and params["study.sampler"] == "rows"
    assert params["overrides.optim.total_kimg"] == "0.048" and params["study.base"] == str(GMM)

    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["sfd-l1", "sfd-l2"]  # the row, not life/sfd-l1
    for run in children:  # each training loss under its own name: L1 and L2 values are not comparable
        loss = run.data.params["loss.name"]
        assert f"train/loss_{loss}" in run.data.metrics and "loss" not in run.data.metrics

    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.tags["mlflow.experiment.primaryMetric.name"] == "objective"
    assert exp.tags["mlflow.experiment.primaryMetric.greaterIsBetter"] == "false"
    assert exp.tags["mlflow.note.content"].startswith("Study life (ablation): A tiny GMM study for tests.")


def test_an_invocation_that_ends_on_an_error_fails_the_parent(tmp_path, stores, monkeypatch):
    def broken(loop, *args):
        raise RuntimeError("the launcher broke")

    path = _study(tmp_path, "broken", ROWS[:1])
    with monkeypatch.context() as patch:
        patch.setattr(sfd.study.run, "run_here", broken)
        with pytest.raises(RuntimeError):
            studies.run_study(str(path), quiet=True)
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("broken").experiment_id], "tags.`sfd.role` = 'study'")
    assert parent.info.status == "FAILED" and parent.data.tags["sfd.error"] == "RuntimeError: the launcher broke"
    again = studies.run_study(str(path), quiet=True)  # the next invocation runs the row: the error is gone
    parent = client.get_run(again.parent_run_id)
    assert parent.info.status == "FINISHED" and "sfd.error" not in parent.data.tags
