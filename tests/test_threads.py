"""Issue 19: the `threads` run setting (sfd.threads), the training cost as processor time, and the study's choice of
workers (`--devices auto`). Why one thread per process (a barrier after every operator waits for a thread that
another process has pushed off its core) is measured, not tested: `python -m sfd.bench threads`, README "On a CPU"."""
import os
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from threadpoolctl import threadpool_info

import sfd.runner.run
import sfd.study as studies
from sfd import tracking as T
from sfd.config import ConfigError, load_config, replace
from sfd.metrics.names import COST_KEY, CPU_TIME_KEY, training_cost
from sfd.runner import run_experiment
from sfd.runner.run import training_cost as run_cost
from sfd.study.record import check_record
from sfd.study.workers import auto_devices
from sfd.threads import cpu_threads, thread_count
from study_runner import write_digits_study

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits_sfd.yaml"
GMM = ROOT / "experiments" / "gmm_sfd.yaml"
CPU = torch.device("cpu")


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.mark.parametrize("value", ["0", "-1", "two", "true", "1.5"])
def test_threads_is_auto_or_a_count_of_at_least_one(value):
    assert load_config(DIGITS).threads == "auto"
    assert load_config(DIGITS, ["threads=2"]).threads == 2
    with pytest.raises(ConfigError, match=r"^threads: got"):
        load_config(DIGITS, [f"threads={value}"])


def test_auto_is_one_thread_on_a_cpu_unless_omp_num_threads_says_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_count("auto", CPU) == 1
    assert thread_count(3, CPU) == 3 and thread_count(3, torch.device("cuda")) == 3
    assert thread_count("auto", torch.device("cuda")) is None  # PyTorch's default: the host only feeds the card
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice (torchrun sets 1)
    assert thread_count("auto", CPU) == 4


def test_cpu_threads_sets_torch_and_blas_for_the_block_then_restores_them():
    torch.set_num_threads(1)  # as conftest leaves it
    blas_before = _blas_threads()
    assert blas_before, "numpy's BLAS is loaded in this process"
    with cpu_threads(2):
        assert torch.get_num_threads() == 2 and set(_blas_threads()) == {2}
    assert torch.get_num_threads() == 1 and _blas_threads() == blas_before
    with cpu_threads(None):
        assert torch.get_num_threads() == 1


def test_a_run_trains_on_its_threads_and_logs_processor_time(stores, monkeypatch):
    """`threads: auto` on the CPU: training runs on one thread, whatever the process had (restored after), the tag
    says so, and the cost is the process's CPU time."""
    seen = []
    real = sfd.runner.run.distill

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(sfd.runner.run, "distill", spy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = load_config(GMM, ["optim.total_kimg=0.32", "eval.num_samples=32", "eval.gap_nfe=10"])
    torch.set_num_threads(2)
    try:
        result = run_experiment(cfg)
        assert torch.get_num_threads() == 2  # the caller's setting is back
    finally:
        torch.set_num_threads(1)
    assert seen == [1]
    run = MlflowClient(T.default_tracking_uri()).get_run(result.run_id)
    assert run.data.tags[T.TAG_THREADS] == "1"
    m = result.metrics
    assert 0 < m[CPU_TIME_KEY] and m[COST_KEY] == pytest.approx(m[CPU_TIME_KEY] / 3600)
    assert "train/gpu_s" not in m and run.data.metrics[COST_KEY] == m[COST_KEY]
    two = run_experiment(replace(cfg, {"threads": 2}))
    assert seen[-1] == 2 and MlflowClient(T.default_tracking_uri()).get_run(two.run_id).data.tags[T.TAG_THREADS] == "2"


def test_the_cost_is_gpu_time_on_a_gpu_and_cpu_time_elsewhere():
    """What `Clock.read` measures, turned into the cost a study compares (no GPU needed to check the choice)."""
    cpu = run_cost({"wall_s": 10.0, "cpu_s": 7.2}, CPU)
    assert cpu == {"train/wall_s": 10.0, CPU_TIME_KEY: 7.2, COST_KEY: pytest.approx(0.002)}
    gpu = run_cost({"wall_s": 10.0, "cpu_s": 7.2, "gpu_s": 3600.0}, CPU)
    assert gpu["train/gpu_s"] == 3600.0 and gpu[COST_KEY] == 1.0 and gpu[CPU_TIME_KEY] == 7.2


def test_a_cost_logged_as_wall_time_is_not_compared():
    assert training_cost({COST_KEY: 0.01, CPU_TIME_KEY: 36.0}) == 0.01
    assert training_cost({COST_KEY: 0.01}) is None  # a run from before: its device-hours were wall time
    assert training_cost({COST_KEY: 0.0}) == 0.0  # nothing trained: nothing to compare
    assert training_cost({}) is None


def test_a_cost_search_does_not_go_on_from_trials_that_recorded_wall_time():
    spec = studies.load_spec("search_digits")
    assert COST_KEY in spec.metrics
    study = optuna.create_study(directions=spec.directions)

    def trial(**attrs):
        return optuna.trial.create_trial(values=[20.0, 0.01], user_attrs={COST_KEY: 0.01, **attrs})

    study.add_trial(trial(**{CPU_TIME_KEY: 36.0}))
    check_record(spec, study, retry_failed=False)  # recorded as processor time: fine
    study.add_trial(trial())
    with pytest.raises(studies.StudyError, match=r"trial\(s\) \[1\] recorded train/device_hours as wall time"):
        check_record(spec, study, retry_failed=False)


def test_auto_devices_put_cpu_table_rows_side_by_side_one_worker_per_core(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = load_config(DIGITS)
    assert auto_devices(True, [cfg, cfg], 10) == ["cpu"] * 4
    assert auto_devices(True, [cfg], 2) == ["cpu"] * 2  # no more workers than runs
    assert auto_devices(True, [cfg, replace(cfg, {"threads": 2})], 10) == ["cpu"] * 2  # cores over threads per run
    assert auto_devices(False, [cfg], 10) is None  # a search: its sampler learns from each trial before the next
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_devices(True, [cfg, replace(cfg, {"device": "cuda"})], 10) is None  # GPU rows keep their device
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert auto_devices(True, [cfg], 10) is None  # one core: one trial at a time, in the study process


def test_a_study_plan_says_where_its_trials_run(tmp_path, stores, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    rows = [{"id": "a", "params": {}}, {"id": "b", "params": {"loss.name": "l2"}}]
    path = write_digits_study(tmp_path, "where", rows)
    assert studies.plan_study(str(path), devices=["auto"]).devices == ["cpu", "cpu"]
    assert studies.plan_study(str(path), devices=["serial"]).devices is None
    assert studies.plan_study(str(path)).devices is None  # the library's default: this process
    with pytest.raises(studies.StudyError, match="give all, auto or serial alone"):
        studies.plan_study(str(path), devices=["auto", "cpu"])
    assert not stores.exists()
