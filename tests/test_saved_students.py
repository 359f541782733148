"""`algorithm: evaluate`: a saved student of ours (an MLflow run id, its student/ folder or .safetensors file, in a
study `row:<id>`) sampled on its own grid without training it again, and the one resolver it shares with the
second stage's first stage. (Reference snapshots: tests/test_reference_students.py.)

The embedded digits teachers at two iterations of batch 16 and 16 evaluation samples: seconds per run. Sampling
draws one generator per seed, so the same student on the same grid, guidance and seeds gives the same samples:
evaluating a saved student must reproduce the metric its training run logged.
"""
import os
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from study_runner import runs_by_row, write_digits_study

from sfd.config import ConfigError, load_config
from sfd.runner import EVALUATED_STUDENT_FILE, STUDENT_FILE, run_experiment
from sfd.study import StudyError, plan_study, run_study
from sfd.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits_sfd.yaml"
TINY = ["optim.batch_size=16", "optim.total_kimg=0.032", "log.every=1", "eval.metrics=[teacher_gap]",
        "eval.num_samples=16", "eval.batch_size=16", "eval.gap_nfe=10"]
EVALUATE = ["algorithm=evaluate", *TINY[3:]]


def _run_count(client: MlflowClient, experiment: str) -> int:
    exp = client.get_experiment_by_name(experiment)
    return 0 if exp is None else len(client.search_runs([exp.experiment_id]))


def test_a_saved_student_is_evaluated_by_run_id_folder_or_file_as_its_training_run_scored_it(tmp_path, stores):
    trained = run_experiment(load_config(DIGITS, [*TINY, "student.nfe=3"]), tracker=Tracker("train"))
    client = MlflowClient(Tracker("train").tracking_uri)
    folder = Path(client.download_artifacts(trained.run_id, "student", str(tmp_path)))
    for ref in (trained.run_id, folder, folder / STUDENT_FILE):
        result = run_experiment(load_config(DIGITS, [*EVALUATE, f"evaluate.student={ref}", "student.nfe=3"]),
                                tracker=Tracker("evaluate"))
        assert result.metrics["nfe"] == 3 and result.metrics["train/wall_s"] == 0
        assert result.metrics["teacher_gap_mean"] == pytest.approx(trained.metrics["teacher_gap_mean"], rel=1e-6)
        run = client.get_run(result.run_id)
        assert run.data.tags["sfd.evaluated_student"] == str(ref) and run.data.tags["sfd.algorithm"] == "evaluate"
        artifacts = {a.path for a in client.list_artifacts(result.run_id)}
        assert EVALUATED_STUDENT_FILE in artifacts and "student" not in artifacts  # nothing trained, nothing saved
    record = yaml.safe_load(Path(client.download_artifacts(result.run_id, EVALUATED_STUDENT_FILE, str(tmp_path / "r")))
                            .read_text())
    assert record["algorithm"] == "sfd" and record["grid"]["num_steps"] == 5


@pytest.mark.parametrize("overrides,message", [
    (["student.nfe=2"], r"evaluate.student: the sfd-trained student of digits \(NFE 3\) samples with "
                        r"student.afs=true, .* \(its sampling.json\); this run differs in nfe: set student.nfe=3$"),
    (["student.nfe=3", "student.t_min=0.002"], "differs in t_min: set student.t_min=0.006"),
    (["student.nfe=3", "evaluate.num_steps_choices=[5,6]"], "is not step-conditioned, so it samples at its own N"),
    (["student.nfe=3", "teacher.name=digits-cond", "eval.metrics=[fd_digits]"],
     "the saved student was distilled with teacher='digits', this run has teacher='digits-cond'"),
])
def test_a_saved_student_evaluated_off_its_own_grid_is_refused_before_a_run_exists(tmp_path, stores, overrides,
                                                                                   message):
    trained = run_experiment(load_config(DIGITS, [*TINY, "student.nfe=3"]), tracker=Tracker("train"))
    # the message says what the student samples with, with the values as a run would write them
    cfg = load_config(DIGITS, [*EVALUATE, f"evaluate.student={trained.run_id}", *overrides])
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg, tracker=Tracker("refused"))
    assert _run_count(MlflowClient(Tracker("train").tracking_uri), "refused") == 0


@pytest.mark.parametrize("overrides,message", [
    ([], "evaluate.student: got null; name the saved student"),
    (["evaluate.student=row:sfd"], "a row of a study; only a study resolves it"),
    (["evaluate.student=/nowhere/student.safetensors"], "neither a folder / .safetensors / .pkl file nor a run id"),
    (["evaluate.student=/nowhere/network-snapshot-000200.pkl"], "the file does not exist"),
    (["evaluate.student=x", "loss.final=l2"], "algorithm=evaluate only samples, it trains nothing"),
    (["evaluate.student=x", "evaluate.num_steps_choices=[4,4]"], "each N once"),
    (["algorithm=sfd", "evaluate.student=x"], "evaluate.student: got 'x', but only algorithm=evaluate reads it"),
])
def test_bad_evaluate_settings_are_one_line_errors(tmp_path, stores, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        run_experiment(load_config(DIGITS, [*EVALUATE, *overrides]), tracker=Tracker("bad"))
    assert "\n" not in str(err.value)


def _rows_with_an_evaluated_row(long_kimg: float) -> list[dict]:
    """A row trained for `long_kimg`, a row that evaluates its student, and a short independent row."""
    return [{"id": "sfd", "params": {"optim.total_kimg": long_kimg}},
            {"id": "sfd-evaluated", "params": {"algorithm": "evaluate", "evaluate.student": "row:sfd"}},
            {"id": "l2", "params": {"loss.name": "l2"}}]


def test_an_evaluate_row_waits_for_the_row_it_evaluates_on_two_workers(tmp_path, stores):
    """The short row frees a worker while the first row still trains: the evaluate row must not start then (it
    would find no student), but once the first row has finished, from that run's student."""
    path = write_digits_study(tmp_path, "evaluated", _rows_with_an_evaluated_row(0.32))
    out = run_study(str(path), quiet=True, devices=["cpu", "cpu"])
    assert not out.failed and out.ran == 3
    runs = runs_by_row(MlflowClient(out.tracking_uri), out)
    first, evaluated, short = runs["sfd"], runs["sfd-evaluated"], runs["l2"]
    assert short.info.end_time < first.info.end_time  # a worker was free before the first row finished
    assert evaluated.info.start_time >= first.info.end_time
    assert evaluated.data.params["evaluate.student"] == first.info.run_id
    assert evaluated.data.tags["sfd.evaluated_student"] == first.info.run_id
    assert evaluated.data.tags["sfd.evaluated_row"] == "sfd"
    # the same student on the same grid and seeds: the training run's own score
    assert evaluated.data.metrics["teacher_gap_mean"] == pytest.approx(first.data.metrics["teacher_gap_mean"],
                                                                       rel=1e-6)


def test_dry_run_holds_an_evaluate_row_like_a_second_stage(tmp_path, stores):
    path = write_digits_study(tmp_path, "evaluated-plan", _rows_with_an_evaluated_row(0.032))
    plan = plan_study(str(path), n_trials=2, devices=["cpu", "cpu"])
    lines = {label: (what, settings) for label, what, settings in plan.lines}
    assert lines["sfd"][0] == "runs" and lines["l2"][0] == "runs" and plan.to_run == 2
    # it is never claimed while 'sfd' runs (sfd.study.plan.may_start): the two trials --n-trials allows are the others
    assert lines["sfd-evaluated"][0] == "waits: beyond --n-trials 2"
    assert lines["sfd-evaluated"][1] == "evaluate row:sfd NFE 2 t_min 0.006 AFS yes"


def test_one_student_distilled_once_and_sampled_at_another_guidance_equals_distilling_again(tmp_path, stores):
    """Issue 24's pattern (distil at guidance 1, sample at several): the evaluate row's scores at guidance 3 equal
    those of a row that distils the same student again and samples it at 3."""
    rows = [{"id": "w1", "params": {}},
            {"id": "w3-trained", "params": {"student.guidance": 3.0}},
            {"id": "w3-evaluated", "params": {"algorithm": "evaluate", "evaluate.student": "row:w1",
                                              "student.guidance": 3.0}}]
    path = write_digits_study(tmp_path, "guided", rows, base="experiments/digits_cond_sfd.yaml",
                              metrics=["class_accuracy", "teacher_gap"])
    assert dict((label, s) for label, _, s in plan_study(str(path)).lines)["w3-evaluated"] == (
        "evaluate row:w1 NFE 2 t_min 0.006 AFS yes guidance 3")
    out = run_study(str(path), quiet=True)
    assert not out.failed
    runs = runs_by_row(MlflowClient(out.tracking_uri), out)
    trained, evaluated = runs["w3-trained"].data.metrics, runs["w3-evaluated"].data.metrics
    assert evaluated["nfe"] == trained["nfe"] == 4  # guidance doubles the evaluations
    for key in ("class_accuracy", "teacher_gap_mean"):
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-6)
    assert runs["w1"].data.metrics["nfe"] == 2


READERS = {
    "evaluate.student": {"algorithm": "evaluate", "evaluate.student": "row:{}"},
    "second_stage.first_stage": {"algorithm": "second-stage", "second_stage.first_stage": "row:{}",
                                 "solver.name": "euler", "solver.m": 2, "student.nfe": 1},
}


@pytest.mark.parametrize("key", READERS)
@pytest.mark.parametrize("algorithm", ["baseline", "evaluate"])
def test_a_row_that_trains_nothing_cannot_be_read_by_another(tmp_path, stores, key, algorithm):
    rows = [{"id": "sfd", "params": {}},
            {"id": "baseline", "params": {"algorithm": "baseline", "solver.name": "euler", "student.afs": False}},
            {"id": "evaluate", "params": {"algorithm": "evaluate", "evaluate.student": "row:sfd"}},
            {"id": "reader", "params": {k: v.format(algorithm) if isinstance(v, str) else v
                                        for k, v in READERS[key].items()}}]
    with pytest.raises(StudyError, match=rf"row reader: {key} names row '{algorithm}', which trains no student "
                                         rf"\(algorithm={algorithm}\); name a training row"):
        run_study(str(write_digits_study(tmp_path, "reads-nothing", rows)), quiet=True)
    assert not stores.exists()


def test_an_evaluate_row_of_an_unfinished_row_fails_with_the_reason(tmp_path, stores):
    rows = [{"id": "sfd", "params": {"optim.lr": 1.0e12, "loss.name": "l2", "optim.nan_check_every": 1}},
            {"id": "sfd-evaluated", "params": {"algorithm": "evaluate", "evaluate.student": "row:sfd"}}]
    out = run_study(str(write_digits_study(tmp_path, "unfinished", rows)), quiet=True)
    assert [n for n, _ in out.failed] == [0, 1]
    assert "it reads the student of row 'sfd', which has not finished" in out.failed[1][1]
    trials = optuna.load_study(study_name="unfinished", storage=out.storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]


def test_an_sfdv_row_evaluated_at_several_n_runs_in_a_smoke_study_too(tmp_path, stores):
    """A smoke SFD-v row trains two of its N (the main one and the largest); an evaluate row of it asks the same
    two, so `--smoke` proves such a study's wiring instead of refusing the N the smoke row no longer trains."""
    rows = [{"id": "sfd-v", "params": {"algorithm": "sfd-v"}},
            {"id": "sfd-v-evaluated", "params": {"algorithm": "evaluate", "evaluate.student": "row:sfd-v",
                                                 "evaluate.num_steps_choices": [4, 5, 6, 7]}}]
    path = write_digits_study(tmp_path, "sfdv-evaluated", rows)
    assert plan_study(str(path)).to_run == 2
    out = run_study(str(path), quiet=True, smoke=True)
    assert not out.failed
    metrics = runs_by_row(MlflowClient(out.tracking_uri), out)["sfd-v-evaluated"].data.metrics
    assert metrics["nfe"] == 2 and {k for k in metrics if "/nfe_" in k} == {"teacher_gap_mean/nfe_5",
                                                                           "teacher_gap_std/nfe_5"}
