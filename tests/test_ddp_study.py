"""A study row with `ddp: 2` runs as one trial on two processes: the study launches `experiments/run.py`, which
relaunches itself under torchrun (gloo on the CPU); rank 0 alone logs the study's child run and writes the outcome
file the study reads back (sfd.study.ddp). A SIGKILL of the study process leaves no torchrun or rank behind.
NCCL (CUDA) is not run here."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from sfd import study as studies
from sfd.distributed import torchrun_command
from sfd.runner import read_outcome
from sfd.study import ddp

ROOT = Path(__file__).resolve().parents[1]
GMM = ROOT / "experiments" / "gmm_sfd.yaml"  # batch 64: splits over 2 ranks
SHORT = {"optim.total_kimg": 0.64, "eval.num_samples": 64, "eval.gap_nfe": 10}  # 10 iterations of batch 64
STUDY_PROCESS = ROOT / "tests" / "study_process.py"


def _write_study(tmp_path, name: str, **params) -> Path:
    spec = {"name": name, "kind": "ablation", "description": "one row on two processes", "base": str(GMM),
            "overrides": SHORT, "objective": {"metric": "teacher_gap_mean", "direction": "minimize"},
            "sampler": {"type": "rows", "seed": 0}, "rows": [{"id": "two-ranks", "params": {"ddp": 2, **params}}]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _children(out):
    client = MlflowClient(out.tracking_uri)
    exp = client.get_experiment_by_name(out.experiment)
    return client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")


@pytest.mark.slow
def test_a_ddp_row_is_one_trial_on_two_ranks_with_one_child_run(tmp_path, stores):
    out = studies.run_study(str(_write_study(tmp_path, "ddp-row")), quiet=True)
    assert out.ran == 1 and not out.failed
    trials = optuna.load_study(study_name="ddp-row", storage=out.storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE]
    client = MlflowClient(out.tracking_uri)
    exp = client.get_experiment_by_name(out.experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`sfd.role` = 'study'")
    assert [p.info.run_id for p in parents] == [out.parent_run_id]
    [run] = _children(out)  # rank 1 logged nothing
    assert run.info.status == "FINISHED" and run.data.params["ddp"] == "2" and run.data.tags["sfd.device"] == "cpu x2"
    assert run.data.tags["sfd.row"] == "two-ranks" and run.data.tags["sfd.trial_number"] == "0"
    assert trials[0].user_attrs["mlflow_run_id"] == run.info.run_id
    assert trials[0].value == run.data.metrics["objective"] == run.data.metrics["teacher_gap_mean"]
    assert run.data.metrics["ddp/max_weight_diff"] == 0.0  # both ranks ended with the same weights


@pytest.mark.slow
def test_a_failed_ddp_run_fails_its_trial_with_the_runs_reason(tmp_path, stores, monkeypatch):
    """The run fails on rank 1 (tests/ddp_fault.py: the real run script under the real torchrun, with an error
    injected into rank 1's third iteration): rank 0 ends the run FAILED naming rank 1's error, and the trial fails
    with that reason, not as an interruption."""
    real_command = ddp.ddp_command

    def command_with_a_fault(job, folder):
        run_args = real_command(job, folder)[2:]  # the run script's own arguments
        return torchrun_command(2, str(ROOT / "tests" / "ddp_fault.py"), run_args)

    monkeypatch.setattr(ddp, "ddp_command", command_with_a_fault)
    monkeypatch.setenv("SFD_TEST_FAULT", "raise")
    monkeypatch.setenv("SFD_TEST_FAULT_RANK", "1")
    out = studies.run_study(str(_write_study(tmp_path, "ddp-fails")), quiet=True)
    [(number, reason)] = out.failed
    assert reason == "RunFailed: RankFailed: rank 1: ZeroDivisionError: injected on one rank on purpose"
    trial = optuna.load_study(study_name="ddp-fails", storage=out.storage).get_trials()[0]
    assert trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted")
    [run] = _children(out)
    assert run.info.status == "FAILED" and trial.user_attrs["mlflow_run_id"] == run.info.run_id


def test_ddp_rows_on_named_gpu_workers_are_refused_up_front(tmp_path, stores, monkeypatch):
    """A worker sees one GPU, so a ddp row cannot run in one: refused before anything is created."""
    monkeypatch.setattr("sfd.study.workers._cuda_count", lambda: 2)  # two cards, as far as --devices can tell
    with pytest.raises(studies.StudyError, match="--devices: a row with ddp > 1 runs under torchrun"):
        studies.run_study(str(_write_study(tmp_path, "ddp-gpus")), quiet=True, devices=["cuda:0", "cuda:1"])
    assert not (stores / "mlflow.db").exists() and not (stores / "optuna.db").exists()


def _rank_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose command line names `marker` (the study's temporary ddp folder)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in process.info["cmdline"] or []):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun is stopped through prctl (Linux)")
def test_a_sigkill_of_the_study_process_leaves_no_rank_behind(tmp_path, stores):
    """The study process dies without a word while its ddp trial trains: torchrun gets SIGTERM from Linux
    (PR_SET_PDEATHSIG), stops both ranks, and the run ends KILLED; the next start settles the trial (interrupted)
    and runs the row again."""
    path = _write_study(tmp_path, "ddp-kill", **{"optim.total_kimg": 640})  # 10,000 iterations: training
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    study = subprocess.Popen([sys.executable, str(STUDY_PROCESS), "--", str(path), "--quiet", "--no-report"],
                             env={**os.environ, "TMPDIR": str(tmp_root)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # both ranks run once torchrun started them (2 ranks + torchrun)
            folders = list(tmp_root.glob("sfd-ddp-*"))
            if folders and (folders[0] / "outcome.json").exists() and len(_rank_processes(folders[0].name)) >= 3:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the ddp trial did not start within 240 s")
        marker = folders[0].name
        os.kill(study.pid, signal.SIGKILL)
        study.wait()
        deadline = time.monotonic() + 60
        while _rank_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _rank_processes(marker) == [], "torchrun or a rank outlived the study process"
    finally:
        if study.poll() is None:
            study.kill()
    run_id = read_outcome(folders[0] / "outcome.json")["run_id"]
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"  # rank 0 ended it on torchrun's SIGTERM
    plan = studies.plan_study(str(path))
    assert plan.lines[0][1] == "runs again (left RUNNING by a process that ended)" and plan.to_run == 1
