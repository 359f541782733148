"""Issue 7 in studies: SFD-v rows (one checkpoint, every trained NFE), second-stage rows that start from another
row of the same study (`second_stage.first_stage: row:<id>`), and guidance rows (doubled NFE, same student).

The embedded digits teachers at two or three iterations of batch 16 and 16 evaluation samples: seconds per row.
"""
import hashlib
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState
from study_runner import SECOND_STAGE as SECOND
from study_runner import runs_by_row
from study_runner import write_digits_study as _write

from sfd import study as studies


def test_second_stage_row_resolves_first_stage_row_and_sfdv_row_logs_every_nfe(tmp_path, stores):
    from reports.build import comparison_table, load_study_data

    rows = [
        {"id": "sfd-nfe5", "group": "sfd", "method": "SFD", "nfe": 5, "params": {"student.nfe": 5}},
        {"id": "sfd-v", "group": "sfd-v", "method": "SFD-v", "nfe": 2, "paper_key": "cifar10/sfd-v/2",
         "params": {"algorithm": "sfd-v", "student.nfe": 2, "sfdv.num_steps_choices": [4, 5, 6, 7]}},
        {"id": "second-stage", "group": "second-stage", "method": "SFD second stage", "nfe": 1, "params": SECOND},
    ]
    path = _write(tmp_path, "i7_rows", rows)
    out = studies.run_study(str(path), quiet=True)
    assert not out.failed
    client = MlflowClient(out.tracking_uri)
    runs = runs_by_row(client, out)
    first_id = runs["sfd-nfe5"].info.run_id

    second = runs["second-stage"]  # the row reference became the first row's run id, recorded three ways
    assert second.data.params["second_stage.first_stage"] == first_id
    assert second.data.tags["sfd.first_stage"] == first_id and second.data.tags["sfd.first_stage_row"] == "sfd-nfe5"
    assert second.data.metrics["nfe"] == 1
    logged = yaml.safe_load(Path(client.download_artifacts(second.info.run_id, "config.yaml", str(tmp_path)))
                            .read_text())
    assert logged["second_stage"]["first_stage"] == first_id  # config.yaml replays without the study

    sfdv = runs["sfd-v"]  # one checkpoint, evaluated at every trained N
    m = sfdv.data.metrics
    assert m["nfe"] == 2 and "teacher_gap_mean" in m
    assert {k for k in m if "/nfe_" in k} == {f"teacher_gap_{s}/nfe_{k}" for s in ("mean", "std") for k in (3, 4, 5)}
    files = {a.path for a in client.list_artifacts(sfdv.info.run_id, "student")}
    assert files == {"student/student.safetensors", "student/sampling.json"}

    data = load_study_data("i7_rows", spec=str(path), tracking_uri=out.tracking_uri, storage=out.storage)
    table = comparison_table(data)
    ours_v = table[(table["Method"] == "SFD-v") & (table["Source"] == "ours")]
    assert list(ours_v["NFE"]) == ["2", "3", "4", "5"]  # one row per NFE, as the paper shows SFD-v
    assert all(sfdv.info.run_id in cell for cell in ours_v["run id"])
    assert list(ours_v["paper (FID)"]) == ["4.28", "3.50", "3.18", "2.95"]
    value = data.rows.set_index("row_id").loc["sfd-v@nfe4", "value"]
    assert value == pytest.approx(m["teacher_gap_mean/nfe_4"])


def test_row_reference_errors_clearly(tmp_path, stores):
    later = [{"id": "second-stage", "params": SECOND}, {"id": "sfd-nfe5", "params": {"student.nfe": 5}}]
    with pytest.raises(studies.StudyError, match="names row 'sfd-nfe5', which comes later in the YAML"):
        studies.run_study(str(_write(tmp_path, "i7_later", later)), quiet=True)
    missing = [{"id": "sfd-nfe5", "params": {"student.nfe": 5}},
               {"id": "second-stage", "params": {**SECOND, "second_stage.first_stage": "row:sfd-nfe7"}}]
    with pytest.raises(studies.StudyError, match="which is not a row of this study"):
        studies.run_study(str(_write(tmp_path, "i7_missing", missing)), quiet=True)
    assert not stores.exists()  # nothing created

    diverges = [{"id": "sfd-nfe5", "params": {"student.nfe": 5, "optim.lr": 1.0e12, "loss.name": "l2",
                                             "optim.nan_check_every": 1}},
                {"id": "second-stage", "params": SECOND}]
    out = studies.run_study(str(_write(tmp_path, "i7_unfinished", diverges)), quiet=True)
    assert [n for n, _ in out.failed] == [0, 1]
    assert "DivergedError" in out.failed[0][1]
    reason = out.failed[1][1]
    assert reason.startswith("StudyError") and "it reads the student of row 'sfd-nfe5', which has not finished" in reason
    assert "is FAIL" in reason
    trials = optuna.load_study(study_name="i7_unfinished", storage=out.storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]


def test_guidance_rows_double_nfe_and_share_the_student(tmp_path, stores):
    rows = [{"id": f"guidance-{w}", "method": "SFD", "guidance": float(w), "paper_key": None,
             "params": {"student.guidance": float(w)}} for w in (1, 3)]
    path = _write(tmp_path, "i7_guidance", rows, base="experiments/digits_cond_sfd.yaml", kind="ablation",
                  metrics=["class_accuracy", "teacher_gap"])
    out = studies.run_study(str(path), quiet=True)
    assert not out.failed
    client = MlflowClient(out.tracking_uri)
    runs = runs_by_row(client, out)
    assert runs["guidance-1"].data.metrics["nfe"] == 2 and runs["guidance-3"].data.metrics["nfe"] == 4
    assert runs["guidance-3"].data.params["student.guidance"] == "3.0"
    assert "class_accuracy" in runs["guidance-3"].data.metrics
    digests = []
    for row in ("guidance-1", "guidance-3"):  # seeded per run: the same distilled network
        dst = tmp_path / row
        dst.mkdir()
        f = client.download_artifacts(runs[row].info.run_id, "student/student.safetensors", str(dst))
        digests.append(hashlib.sha256(Path(f).read_bytes()).hexdigest())
    assert digests[0] == digests[1]

    from reports.build import ablation_table, load_study_data

    data = load_study_data("i7_guidance", spec=str(path), tracking_uri=out.tracking_uri, storage=out.storage)
    table = ablation_table(data)
    assert list(table["guidance ω"]) == ["1", "3"] and list(table["NFE"]) == ["2", "4"]
    assert "paper (FID)" not in table  # paper_key: null on every row: no paper counterpart, so no paper column
