"""One run on two ranks end to end: `experiments/run.py ... ddp=2` relaunches itself under torchrun (gloo on the
CPU), rank 0 alone logs one MLflow child run and writes the outcome file; an error on rank 1 ends the run FAILED
with rank 1's reason, and every process exits. NCCL (CUDA) is not run here."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfd.config import load_config
from sfd.runner import OutcomeFile, read_outcome, run_experiment
from sfd.tracking import TAG_PARENT, Tracker, find_runs, get_client, get_or_create_experiment

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "experiments" / "run.py"
FAULT_PY = ROOT / "tests" / "ddp_fault.py"
GMM = str(ROOT / "experiments" / "gmm_sfd.yaml")  # 40 iterations of batch 64, 256 evaluation samples: seconds
EXPERIMENT = "ddp-test"


def run_until_done(cmd: list[str], timeout: float = 300, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` in its own session; on timeout kill the whole session (torchrun and its ranks) and fail."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=ROOT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{cmd} still running after {timeout} s (a hang)")
    return subprocess.CompletedProcess(cmd, proc.returncode, out), time.monotonic() - start


@pytest.mark.slow
def test_two_ranks_log_one_child_run_that_matches_one_process(stores, tmp_path):
    client = get_client()
    exp = get_or_create_experiment(client, EXPERIMENT)
    parent = client.create_run(exp, run_name="a study").info.run_id
    result_file = tmp_path / "outcome.json"
    cmd = [sys.executable, str(RUN_PY), GMM, "ddp=2", "log.every=1", "--experiment", EXPERIMENT, "--parent-run-id",
           parent, "--tag", "sfd.row=r1", "--objective", "teacher_gap_mean", "--result-file", str(result_file)]
    proc, _ = run_until_done(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:]

    outcome = read_outcome(result_file)
    children = find_runs(client, exp, {TAG_PARENT: parent})
    assert [c.info.run_id for c in children] == [outcome["run_id"]]  # one child run, from rank 0 alone
    run = children[0]
    assert run.info.status == outcome["status"] == "FINISHED" and outcome["ddp"] == 2
    assert run.data.params["ddp"] == "2" and run.data.tags["sfd.device"] == "cpu x2" and run.data.tags["sfd.row"] == "r1"
    assert run.data.metrics["ddp/max_weight_diff"] == 0.0  # both ranks ended with the same weights
    assert outcome["objective"] == [run.data.metrics["teacher_gap_mean"]] == [run.data.metrics["objective"]]
    assert "student/student.safetensors" in {f.path for f in client.list_artifacts(run.info.run_id, "student")}

    # The same run in one process. Each rank trains on its half of the one-process batch's draws, so the two differ
    # only by float32 summation order (measured: the teacher gap bit-identical, the per-iteration loss within
    # 1.1e-7 relative). Adam's 1/sqrt(v) can amplify rounding where a gradient is near zero, hence the margins; a
    # wrong split (both ranks training on the same half) moved the gap by 9e-3 relative.
    single = run_experiment(load_config(GMM, ["log.every=1"]), tracker=Tracker(EXPERIMENT))
    assert run.data.metrics["teacher_gap_mean"] == pytest.approx(single.metrics["teacher_gap_mean"], rel=1e-4)
    losses = {rid: [m.value for m in client.get_metric_history(rid, "train/loss_l1")] for rid in (run.info.run_id, single.run_id)}
    assert len(losses[run.info.run_id]) == 40
    assert losses[run.info.run_id] == pytest.approx(losses[single.run_id], rel=1e-5)


@pytest.mark.slow
def test_an_error_on_one_rank_fails_the_run_on_rank_0_and_every_rank_exits(stores, tmp_path):
    result_file = tmp_path / "outcome.json"
    # torchrun started directly: the config leaves ddp at 1, so the run follows torchrun's two processes.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(FAULT_PY), GMM,
           "--experiment", EXPERIMENT, "--result-file", str(result_file)]
    proc, seconds = run_until_done(cmd, SFD_TEST_FAULT="raise", SFD_TEST_FAULT_RANK="1")
    assert proc.returncode != 0
    reason = "RankFailed: rank 1: ZeroDivisionError: injected on one rank on purpose"
    outcome = read_outcome(result_file)
    assert outcome["status"] == "FAILED" and outcome["error"] == reason
    run = get_client().get_run(outcome["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["sfd.error"] == reason and run.data.params["ddp"] == "2"
    assert seconds < 120  # everyone left at once; a rank left waiting in a collective would sit out its timeout


# ----- the outcome file -------------------------------------------------------------------------------------

def _load_run_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sfd_experiments_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_outcome_file_follows_the_run_and_only_rank_0_writes_it(stores, tmp_path, monkeypatch):
    path = tmp_path / "out" / "outcome.json"
    cfg = load_config(GMM, ["optim.total_kimg=0.128", "eval.num_samples=8"])
    outcome = OutcomeFile(path)
    seen = []

    def on_start(run_id):
        outcome.started(run_id)
        seen.append(read_outcome(path))

    tracker = Tracker(EXPERIMENT, objective=["teacher_gap_mean"], on_start=on_start)
    with outcome.reporting():
        result = run_experiment(cfg, tracker=tracker)
        outcome.finished(result)
    assert seen[0]["status"] == "RUNNING" and seen[0]["run_id"] == result.run_id  # as soon as the run exists
    final = read_outcome(path)
    assert final["status"] == "FINISHED" and final["run_id"] == result.run_id and final["error"] is None
    assert final["metrics"] == pytest.approx(result.metrics) and final["objective"] == result.objective
    assert final["ddp"] == 1 and not list(path.parent.glob(".*tmp"))  # replaced atomically, nothing left over

    with pytest.raises(KeyboardInterrupt), OutcomeFile(path).reporting():
        raise KeyboardInterrupt
    assert read_outcome(path)["status"] == "KILLED"
    monkeypatch.setenv("RANK", "1")
    OutcomeFile(path).started("another")
    assert read_outcome(path)["status"] == "KILLED"  # rank 1 wrote nothing


def test_bad_input_is_an_invalid_outcome_and_exit_status_2(stores, tmp_path):
    script = _load_run_script()
    path = tmp_path / "outcome.json"
    assert script.main([GMM, "--tag", "no-equals-sign", "--result-file", str(path)]) == 2
    assert read_outcome(path) == {**read_outcome(path), "status": "INVALID", "run_id": None,
                                  "error": "ConfigError: --tag: got 'no-equals-sign'; expected KEY=VALUE"}
    assert script.main([GMM, "ddp=3", "--result-file", str(path)]) == 2  # refused before any relaunch
    assert "optim.batch_size: got 64 with ddp=3" in read_outcome(path)["error"]
    assert not (stores / "mlflow.db").exists()
