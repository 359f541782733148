"""Studies with `--devices`: trials side by side in worker processes, one per device.

The embedded digits teacher at a few iterations (seconds per row); two CPU workers stand in for two GPUs.
"""
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState
from study_runner import SECOND_STAGE as SECOND
from study_runner import load_study_script, runs_by_row, stop_after_ask, stop_next_training, write_digits_study

import sfd.study.devices
import sfd.study.workers
from sfd import study as studies
from sfd.study.loop import TrialLoop, make_sampler
from sfd.study.workers import resolve_devices, worker_environment

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "studies" / "run.py"
script = load_study_script("sfd_studies_run_parallel")


def _rows(long_kimg: float) -> list[dict]:
    """A first stage and an independent row that run at once (both `long_kimg`), then a second stage that must
    wait for the first, and a short row."""
    return [{"id": "sfd-nfe5", "params": {"student.nfe": 5, "optim.total_kimg": long_kimg}},
            {"id": "second-stage", "params": SECOND},
            {"id": "l2", "params": {"loss.name": "l2", "optim.total_kimg": long_kimg}},
            {"id": "nfe3", "params": {"student.nfe": 3}}]


def test_two_workers_run_rows_side_by_side_with_the_serial_results(tmp_path, stores):
    path = write_digits_study(tmp_path, "side", _rows(0.32))
    out = studies.run_study(str(path), quiet=True, devices=["cpu", "cpu"])
    assert not out.failed and out.ran == 4
    client = MlflowClient(out.tracking_uri)
    assert client.get_run(out.parent_run_id).data.tags["sfd.devices"] == "cpu cpu"
    trials = optuna.load_study(study_name="side", storage=out.storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    runs = runs_by_row(client, out)
    for t in trials:  # linked both ways, as in a serial study
        run = runs[t.user_attrs["row"]]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"] and run.data.tags["sfd.trial_number"] == str(t.number)
        assert run.info.status == "FINISHED" and run.data.metrics["objective"] == t.value
        assert run.data.tags["sfd.worker_device"] == "cpu" and run.data.params["device"] == "cpu"

    first, other, second = runs["sfd-nfe5"].info, runs["l2"].info, runs["second-stage"]
    assert first.start_time < other.end_time and other.start_time < first.end_time  # they ran at the same time
    assert second.data.params["second_stage.first_stage"] == first.run_id
    assert second.info.start_time >= first.end_time  # the second stage waited for its first stage

    serial = studies.run_study(str(write_digits_study(tmp_path, "one-by-one", _rows(0.32))), quiet=True)
    expected = {t.user_attrs["row"]: t.value
                for t in optuna.load_study(study_name="one-by-one", storage=serial.storage).get_trials()}
    assert {t.user_attrs["row"]: t.value for t in trials} == pytest.approx(expected, rel=1e-5)


def _interrupt_first_row(monkeypatch, path) -> None:
    """The first row interrupted by SIGTERM, the later rows still queued."""
    stop_next_training(monkeypatch, lambda: studies.run_study(str(path), quiet=True))


@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]], ids=["here", "workers"])
def test_a_resumed_second_stage_waits_for_its_retried_first_stage(tmp_path, stores, monkeypatch, devices):
    """The retry of an interrupted first stage is queued after the second stage already waiting; the second
    stage must still run after it, from the retry's model."""
    path = write_digits_study(tmp_path, "resume", _rows(0.032))
    _interrupt_first_row(monkeypatch, path)
    out = studies.run_study(str(path), quiet=True, devices=devices)
    assert not out.failed and out.ran == 4
    trials = optuna.load_study(study_name="resume", storage=out.storage).get_trials()
    done = {t.user_attrs["row"]: t for t in trials if t.state == TrialState.COMPLETE}
    assert sorted(done) == ["l2", "nfe3", "second-stage", "sfd-nfe5"]
    second = MlflowClient(out.tracking_uri).get_run(done["second-stage"].user_attrs["mlflow_run_id"])
    assert second.data.params["second_stage.first_stage"] == done["sfd-nfe5"].user_attrs["mlflow_run_id"]


def test_a_second_stage_beyond_n_trials_stays_queued_and_runs_next_time(tmp_path, stores, monkeypatch):
    """A second stage is claimed only once its first stage has finished, so one left over at the --n-trials limit
    just stays queued (nothing is claimed and put back)."""
    path = write_digits_study(tmp_path, "limited", _rows(0.032)[:2])
    _interrupt_first_row(monkeypatch, path)  # queue: second-stage, then the retry of sfd-nfe5
    out = studies.run_study(str(path), quiet=True, n_trials=1)
    assert out.ran == 1 and not out.failed
    trials = optuna.load_study(study_name="limited", storage=out.storage).get_trials()
    second = next(t for t in trials if t.user_attrs["row"] == "second-stage")
    assert second.state == TrialState.WAITING and "fail_reason" not in second.user_attrs
    assert [t.user_attrs["row"] for t in trials if t.state == TrialState.COMPLETE] == ["sfd-nfe5"]
    again = studies.run_study(str(path), quiet=True)
    assert again.ran == 1 and not again.failed
    assert optuna.load_study(study_name="limited", storage=out.storage).trials[1].state == TrialState.COMPLETE


def test_ctrl_c_during_a_first_stage_leaves_its_second_stage_queued(tmp_path, stores, monkeypatch):
    path = write_digits_study(tmp_path, "twice", _rows(0.032)[:2])
    _interrupt_first_row(monkeypatch, path)  # queue: second-stage, then the retry of sfd-nfe5
    _interrupt_first_row(monkeypatch, path)  # the retry stopped; second-stage never claimed
    trials = optuna.load_study(study_name="twice", storage=f"sqlite:///{stores / 'optuna.db'}").get_trials()
    assert [(t.user_attrs["row"], t.state) for t in trials] == [("sfd-nfe5", TrialState.FAIL),
                                                                ("second-stage", TrialState.WAITING),
                                                                ("sfd-nfe5", TrialState.FAIL)]
    assert trials[2].user_attrs["fail_reason"] == ("interrupted: the study process stopped during this trial "
                                                   "(Terminated: stopped by SIGTERM)")
    out = studies.run_study(str(path), quiet=True)
    assert out.ran == 2 and not out.failed  # both rows again, the first stage first


@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]], ids=["here", "workers"])
def test_a_stop_right_after_asking_leaves_no_trial_running(tmp_path, stores, monkeypatch, devices):
    """SIGTERM arriving just after Optuna hands out a trial (before it is held or running) is acted on once the
    trial is recorded, so it is marked interrupted, not left RUNNING until the next start repairs it."""
    path = write_digits_study(tmp_path, "asked", _rows(0.032)[:2])
    stop_after_ask(monkeypatch, lambda: studies.run_study(str(path), quiet=True, devices=devices))
    trials = optuna.load_study(study_name="asked", storage=f"sqlite:///{stores / 'optuna.db'}").get_trials()
    assert [(t.user_attrs["row"], t.state, t.user_attrs.get("interrupted")) for t in trials] == [
        ("sfd-nfe5", TrialState.FAIL, True), ("second-stage", TrialState.WAITING, None)]
    assert trials[0].user_attrs["fail_reason"].endswith("(Terminated: stopped by SIGTERM)")
    out = studies.run_study(str(path), quiet=True, devices=devices)
    assert out.ran == 2 and not out.failed


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]], ids=["here", "workers"])
def test_dry_run_predicts_which_rows_start_when_a_second_stage_waits(tmp_path, stores, monkeypatch, devices,
                                                                     resumed):
    """With --n-trials, a second stage held for its first stage may be left unstarted; the plan must name the
    rows the run then starts (resumed: the interrupted first stage is queued behind the rows already waiting)."""
    path = write_digits_study(tmp_path, "predict", _rows(0.032)[:3])  # sfd-nfe5, second-stage, l2
    if resumed:
        _interrupt_first_row(monkeypatch, path)
    n = 1 if resumed else 2
    plan = studies.plan_study(str(path), n_trials=n, devices=devices)
    out = studies.run_study(str(path), quiet=True, n_trials=n, devices=devices)
    trials = optuna.load_study(study_name="predict", storage=out.storage).get_trials()
    started = sorted(t.user_attrs["row"] for t in trials if t.state == TrialState.COMPLETE)
    predicted = sorted(label for label, what, _ in plan.lines if what in ("runs", "queued") or what.startswith(
        "runs again"))
    assert predicted == started and plan.to_run == out.ran
    unstarted = {label for label, what, _ in plan.lines if what.startswith("not started")}
    assert unstarted == {t.user_attrs["row"] for t in trials
                         if t.user_attrs.get("fail_reason", "").startswith("interrupted: not started")}


def test_a_grid_search_on_two_workers_runs_each_point_once(tmp_path, stores):
    space = {"solver.name": {"type": "categorical", "choices": ["euler", "dpmpp3m"]},
             "loss.name": {"type": "categorical", "choices": ["l1", "l2"]}}
    path = write_digits_study(tmp_path, "grid2", None, kind="search", space=space, n_trials=6,
                              sampler={"type": "grid", "seed": 0})
    out = studies.run_study(str(path), quiet=True, devices=["cpu", "cpu"])
    assert not out.failed and out.ran == 4
    trials = optuna.load_study(study_name="grid2", storage=out.storage).get_trials()
    assert sorted((t.params["solver.name"], t.params["loss.name"]) for t in trials) == [
        ("dpmpp3m", "l1"), ("dpmpp3m", "l2"), ("euler", "l1"), ("euler", "l2")]


def test_an_error_in_the_study_process_stops_the_workers_cleanly(tmp_path, stores, monkeypatch):
    """Not only Ctrl-C: any error in the study process (here: recording a result fails) stops the busy
    workers, whose runs end KILLED and whose trials are interrupted. The trial whose run had finished is not
    thrown away: its result could not be told, so it stays RUNNING and the next start adopts its run."""
    rows = [{"id": "quick", "params": {"student.nfe": 3}}, {"id": "long", "params": {"optim.total_kimg": 3.2}}]
    path = write_digits_study(tmp_path, "broken", rows)

    def broken(self, *args):  # once long's worker has created its run (its worker may still be starting)
        client, deadline = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}"), time.time() + 120
        while not client.search_runs([client.get_experiment_by_name("broken").experiment_id],
                                     "tags.`sfd.row` = 'long'") and time.time() < deadline:
            time.sleep(0.2)
        raise RuntimeError("database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(TrialLoop, "finish", broken)
        with pytest.raises(RuntimeError, match="database is locked"):
            studies.run_study(str(path), quiet=True, devices=["cpu", "cpu"])
    storage = f"sqlite:///{stores / 'optuna.db'}"
    trials = {t.user_attrs["row"]: t for t in optuna.load_study(study_name="broken", storage=storage).get_trials()}
    long, quick = trials["long"], trials["quick"]
    assert long.state == TrialState.FAIL and long.user_attrs["interrupted"] is True
    assert long.user_attrs["fail_reason"].endswith("(RuntimeError: database is locked)")
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    long_run = client.get_run(long.user_attrs["mlflow_run_id"])
    assert long_run.info.status == "KILLED"  # stopped mid-training by the study process
    parent = client.get_run(long_run.data.tags["mlflow.parentRunId"])  # the study failed: an error, not a stop
    assert parent.info.status == "FAILED" and parent.data.tags["sfd.error"] == "RuntimeError: database is locked"
    assert quick.state == TrialState.RUNNING
    assert client.get_run(quick.user_attrs["mlflow_run_id"]).info.status == "FINISHED"

    again = studies.run_study(str(path), quiet=True, devices=["cpu", "cpu"])
    assert again.ran == 2 and not again.failed  # the adopted trial and long's retry
    trials = optuna.load_study(study_name="broken", storage=storage).get_trials()
    assert trials[quick.number].state == TrialState.COMPLETE  # adopted: the same trial, its run not redone
    assert trials[quick.number].user_attrs["mlflow_run_id"] == quick.user_attrs["mlflow_run_id"]
    finished = runs_by_row(client, again)
    assert len(client.search_runs([long_run.info.experiment_id], "attributes.status = 'FINISHED' and "
                                  "tags.`sfd.row` = 'quick'")) == 1 and finished["quick"].info.status == "FINISHED"
    assert client.get_run(again.parent_run_id).info.status == "FINISHED"  # the rerun ends it


@pytest.mark.parametrize("devices, message", [
    (["gpu0"], "each entry is cpu or cuda:<index>"),
    (["cpu", "cuda:99"], "cuda:99 does not exist here"),
    (["all", "cpu"], "each entry is cpu or cuda:<index>"),
    (["all"], "--devices all: this process sees no CUDA device"),
])
def test_unusable_devices_are_refused_before_anything_is_created(tmp_path, stores, devices, message, monkeypatch):
    monkeypatch.setattr(sfd.study.workers, "_cuda_count", lambda: 0)  # as on a machine without a GPU
    path = write_digits_study(tmp_path, "baddev", _rows(0.032))
    with pytest.raises(studies.StudyError, match=message):
        studies.run_study(str(path), quiet=True, devices=devices)
    assert script.main([str(path), "--devices", *devices]) == 2
    assert not stores.exists()


def test_all_devices_are_every_cuda_device_this_process_sees(monkeypatch):
    monkeypatch.setattr(sfd.study.workers, "_cuda_count", lambda: 3)
    assert resolve_devices(["all"]) == ["cuda:0", "cuda:1", "cuda:2"]
    assert resolve_devices(["cuda:2", "cpu", "cuda:2"]) == ["cuda:2", "cpu", "cuda:2"]


def test_worker_environment_pins_one_card_and_leaves_cpu_threads_to_the_run(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_environment("cuda:3") == ("cuda", {"CUDA_VISIBLE_DEVICES": "3"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # cuda:1 of this process is physical card 6
    assert worker_environment("cuda:1") == ("cuda", {"CUDA_VISIBLE_DEVICES": "6"})
    # a CPU worker's runs set their own threads (`threads: auto` is one each): no OMP_NUM_THREADS that would
    # stand in for the user's choice
    assert worker_environment("cpu") == ("cpu", {})


def _exit_with_torch_threads() -> None:
    sys.exit(torch.get_num_threads())


def test_a_worker_process_starts_with_its_devices_environment(monkeypatch):
    """A worker's OMP_NUM_THREADS (and CUDA_VISIBLE_DEVICES) must be in place before it imports torch, which a
    spawned process does before any code of ours runs (it re-imports the study script); the study process's own
    environment is left as it was. (torch caps its threads at the cores: 2 tells the child's setting apart.)"""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: torch runs one thread whatever OMP_NUM_THREADS says")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("SFD_WORKER_TEST", raising=False)
    process = multiprocessing.get_context("spawn").Process(target=_exit_with_torch_threads)
    with sfd.study.workers._environment({"OMP_NUM_THREADS": "2", "SFD_WORKER_TEST": "set"}):
        process.start()
    process.join(120)
    assert process.exitcode == 2
    assert os.environ["OMP_NUM_THREADS"] == "1" and "SFD_WORKER_TEST" not in os.environ


def test_parallel_tpe_assumes_running_trials_scored_badly(tmp_path):
    spec = studies.load_spec("search_digits")
    assert spec.sampler == "tpe"
    assert make_sampler(spec, parallel=True)._constant_liar is True
    assert make_sampler(spec)._constant_liar is False


# ----- stopping: the study process and its workers as the CLI runs them -------------------------------------

def _env(runs: Path) -> dict:
    env = {**os.environ, "SFD_RUNS_DIR": str(runs), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _start(tmp_path, name: str, rows: list[dict], devices: list[str]):
    runs = tmp_path / "runs"
    runs.mkdir()
    storage = f"sqlite:///{runs / 'optuna.db'}"
    optuna.storages.RDBStorage(storage)  # schema first: polling a sqlite file the child is creating races
    path = write_digits_study(tmp_path, name, rows)
    cmd = [sys.executable, str(RUN_PY), str(path), "--no-report", "--devices", *devices]
    proc = subprocess.Popen(cmd, env=_env(runs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, storage, f"sqlite:///{runs / 'mlflow.db'}"


def _wait_running(proc, name: str, storage: str, count: int = 1, row: str | None = None,
                  deadline_s: float = 240) -> None:
    """Until `count` trials (of `row`, if given) are running with their MLflow runs created (then a little
    longer: mid-training)."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        try:
            trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        except KeyError:  # not created yet
            continue
        if len([t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
                and row in (None, t.user_attrs.get("row"))]) >= count:
            time.sleep(1.0)
            return
    raise AssertionError(f"{count} trials never ran at once")


def _worker_pids(pid: int) -> set[int]:
    """The spawned worker processes of `pid` (not multiprocessing's resource tracker, which ends on its own)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                found.add(int(stat.parent.name))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc (Linux)")
def test_sigterm_stops_every_worker_and_ends_their_runs_killed(tmp_path):
    proc, storage, tracking = _start(tmp_path, "stopme", _rows(3.2), ["cpu", "cpu"])
    try:
        _wait_running(proc, "stopme", storage, count=2)
        workers = _worker_pids(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output
    assert len(workers) == 2 and not [p for p in workers if _alive(p)]  # no worker left behind
    client = MlflowClient(tracking)
    trials = {t.user_attrs["row"]: t for t in optuna.load_study(study_name="stopme", storage=storage).get_trials()}
    for row in ("sfd-nfe5", "l2"):  # the two that were running: their runs ended KILLED by the worker itself
        t = trials[row]
        assert t.state == TrialState.FAIL and t.user_attrs["interrupted"] is True
        assert t.user_attrs["fail_reason"] == ("interrupted: the study process stopped during this trial "
                                               "(Terminated: stopped by SIGTERM)")
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["sfd.error"].startswith("Terminated")
    assert trials["second-stage"].state == TrialState.WAITING  # never claimed: its first stage did not finish
    assert trials["nfe3"].state == TrialState.WAITING
    parent = client.get_run(client.get_run(trials["l2"].user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker process through /proc (Linux)")
def test_a_worker_killed_from_outside_is_retried_one_that_crashes_fails(tmp_path):
    """SIGKILL (preemption, an operator, the OOM killer) or SIGTERM to a worker alone interrupts its trial: the row
    is queued again at once and completes, and a second stage waiting for it runs after the retry. A worker that
    dies of a crash signal (SIGSEGV) fails its trial with the reason, which stays failed. A fresh worker takes the
    next trial either way."""
    rows = [{"id": "doomed", "params": {"optim.total_kimg": 3.2}},
            {"id": "stopped", "params": {"student.nfe": 5, "optim.total_kimg": 3.2}},
            {"id": "its-second-stage", "params": {**SECOND, "second_stage.first_stage": "row:stopped"}},
            {"id": "crashes", "params": {"loss.name": "l2", "optim.total_kimg": 3.2}},
            {"id": "after", "params": {"loss.name": "l2"}}]
    proc, storage, tracking = _start(tmp_path, "dies", rows, ["cpu"])
    try:
        for row, how in (("doomed", signal.SIGKILL), ("stopped", signal.SIGTERM), ("crashes", signal.SIGSEGV)):
            _wait_running(proc, "dies", storage, row=row)
            (worker,) = _worker_pids(proc.pid)
            os.kill(worker, how)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output  # the crash
    assert "Traceback" not in output, output
    trials = optuna.load_study(study_name="dies", storage=storage).get_trials()
    by_row = {row["id"]: [t for t in trials if t.user_attrs["row"] == row["id"]] for row in rows}
    client = MlflowClient(tracking)
    for row, how in (("doomed", "was killed by SIGKILL"), ("stopped", "was stopped (Terminated: stopped by SIGTERM)")):
        killed, retry = by_row[row]  # interrupted once, then queued again and completed
        assert killed.state == TrialState.FAIL and killed.user_attrs["interrupted"] is True
        assert killed.user_attrs["fail_reason"] == (f"interrupted: its worker on cpu {how} (attempt 1 of 3; it runs "
                                                    "again)")
        assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status in ("FAILED", "KILLED")
        assert retry.state == TrialState.COMPLETE
    (crashed,) = by_row["crashes"]  # a failure of its own: stays failed unless --retry-failed
    assert crashed.state == TrialState.FAIL and "interrupted" not in crashed.user_attrs
    assert crashed.user_attrs["fail_reason"].startswith("WorkerDied") and "SIGSEGV" in crashed.user_attrs["fail_reason"]
    run = client.get_run(crashed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["sfd.error"].startswith("WorkerDied")
    (second,) = by_row["its-second-stage"]  # claimed once its first stage's retry had finished, from that run
    assert second.state == TrialState.COMPLETE
    second_run = client.get_run(second.user_attrs["mlflow_run_id"])
    assert second_run.data.params["second_stage.first_stage"] == by_row["stopped"][1].user_attrs["mlflow_run_id"]
    assert [t.state for t in by_row["after"]] == [TrialState.COMPLETE]
    every = client.search_runs([run.info.experiment_id])
    assert not [r for r in every if r.info.status == "RUNNING"]


def test_a_row_whose_worker_is_killed_three_times_in_a_row_stays_failed(tmp_path, stores):
    """The retries of a trial whose worker is killed from outside are bounded: the third kill in a row is
    recorded as the row's failure (WorkerKilled), so a worker the OOM killer ends every time does not loop."""
    path = write_digits_study(tmp_path, "oom", [{"id": "big", "params": {}}])
    killed, real_take = [], sfd.study.devices._take

    def take_then_kill(loop, worker, message, running, *board):
        real_take(loop, worker, message, running, *board)
        if message[0] == "started":  # its run exists: kill the worker now, as the OOM killer would (SIGKILL)
            killed.append(worker.process.pid)
            os.kill(worker.process.pid, signal.SIGKILL)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sfd.study.devices, "_take", take_then_kill)
        out = studies.run_study(str(path), quiet=True, devices=["cpu"])
    assert len(killed) == 3 and len(out.failed) == 1
    trials = optuna.load_study(study_name="oom", storage=out.storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert [t.user_attrs.get("interrupted") for t in trials] == [True, True, None]
    assert trials[-1].user_attrs["fail_reason"] == ("WorkerKilled: its worker on cpu was killed by SIGKILL, on each "
                                                    "of 3 attempts in a row")
    assert studies.plan_study(str(path)).to_run == 0  # stays failed
    assert studies.plan_study(str(path), retry_failed=True).to_run == 1


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker process through /proc (Linux)")
def test_a_worker_whose_study_process_was_killed_stops_its_run(tmp_path):
    """SIGKILL leaves the study process no chance to stop its workers: each stops itself, its run ends KILLED
    (not FINISHED unseen, which the study's next start would run again beside it)."""
    rows = [{"id": "orphaned", "params": {"optim.total_kimg": 3.2}}]
    proc, storage, tracking = _start(tmp_path, "orphan", rows, ["cpu"])
    try:
        _wait_running(proc, "orphan", storage, count=1)
        (worker,) = _worker_pids(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        deadline = time.time() + 60
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not _alive(worker)
    (trial,) = optuna.load_study(study_name="orphan", storage=storage).get_trials()
    assert trial.state == TrialState.RUNNING  # the study's next start marks it interrupted and runs it again
    run = MlflowClient(tracking).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["sfd.error"].startswith("Terminated")
