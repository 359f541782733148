"""One run on several ranks (sfd.distributed): the pieces in one process, then training and evaluation in a real
2-rank gloo group (spawned processes, tests/ddp_workers.py) compared with one process. The torchrun end-to-end
runs are in tests/test_ddp_run.py."""
import sys

import numpy as np
import pytest
import torch

import sfd.metrics.evaluate
from ddp_workers import (PixelFeatures, distill_cases, evaluate_cases, evaluate_on_rank, run_ranks, train_gmm,
                         write_fid_reference)
from sfd.config import ConfigError, load_config
from sfd.distributed import SINGLE, Ranks, rank_seed, torchrun_command
from sfd.metrics.fd import FeatureStats
from sfd.runner import run_experiment, smoke_config


def test_rows_split_a_global_batch_into_equal_contiguous_shares():
    shares = [Ranks(r, 4).rows(12) for r in range(4)]
    assert [list(range(12))[s] for s in shares] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert SINGLE.rows(7) == slice(0, 7)
    with pytest.raises(ValueError, match="does not split evenly"):
        Ranks(0, 4).rows(10)


def test_one_process_collectives_change_nothing():
    x = torch.arange(3.0)
    assert SINGLE.mean(x) is x and SINGLE.sum_(x) is x and SINGLE.gather("a") == ["a"] and SINGLE.broadcast(5) == 5
    assert SINGLE.weight_spread(torch.nn.Linear(2, 2)) == 0.0 and SINGLE.place(torch.device("cuda")).index is None


def test_rank_seeds_keep_rank_0_on_the_run_seed_and_differ_elsewhere():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, r) for r in range(1, 5)} | {rank_seed(8, 1)}
    assert len(seeds) == 5 and 7 not in seeds and all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(7, 1) == rank_seed(7, 1)  # a pure function: reruns draw the same masks


def test_torchrun_command_runs_the_script_with_this_interpreter():
    cmd = torchrun_command(3, "experiments/run.py", ["cfg.yaml", "ddp=3"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "3" and "--standalone" in cmd
    assert cmd[-3:] == ["experiments/run.py", "cfg.yaml", "ddp=3"]


@pytest.mark.parametrize("overrides, message", [
    (["ddp=0"], "ddp: got 0"),
    (["ddp=3"], "optim.batch_size: got 64 with ddp=3"),
    (["ddp=2", "device=cuda:1"], "device: got 'cuda:1' with ddp=2"),
    (["ddp=2", "device=mps"], "device: got 'mps' with ddp=2"),
])
def test_bad_ddp_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("experiments/gmm_sfd.yaml", overrides)


def test_a_baseline_need_not_split_a_batch_it_never_trains():
    cfg = load_config("experiments/gmm_sfd.yaml", ["algorithm=baseline", "ddp=3", "student.nfe=3", "student.afs=false",
                                                   "solver.name=euler"])
    assert cfg.ddp == 3


@pytest.mark.parametrize("ddp, batch", [(1, 2), (2, 2), (3, 3), (4, 4)])
def test_smoke_batch_splits_over_the_processes(ddp, batch):
    cfg, _ = smoke_config(load_config("experiments/digits_sfd.yaml", [f"ddp={ddp}", "optim.batch_size=96"]))
    assert cfg.optim.batch_size == batch


def test_a_ddp_run_outside_torchrun_is_refused_before_any_run_exists(stores, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config("experiments/gmm_sfd.yaml", ["ddp=2"])
    with pytest.raises(ConfigError, match="not started by torchrun"):
        run_experiment(cfg)
    assert not (stores / "mlflow.db").exists()


def test_ddp_follows_torchrun_when_the_config_leaves_it_at_one(monkeypatch):
    from sfd.runner import check_ddp, ddp_for_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = ddp_for_launch(load_config("experiments/gmm_sfd.yaml"))
    assert cfg.ddp == 2
    check_ddp(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="torchrun started 2 processes"):
        check_ddp(load_config("experiments/gmm_sfd.yaml", ["ddp=4"]), torch.device("cpu"))


# ----- a real 2-rank gloo group -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated_on_two_ranks(tmp_path_factory):
    """What `evaluate_on_rank` returned on each of two ranks, and the FID reference statistics it used."""
    tmp = tmp_path_factory.mktemp("ddp-eval")
    ref = write_fid_reference(tmp / "ref.npz")
    return run_ranks(evaluate_on_rank, tmp, ref), ref


@pytest.mark.slow
def test_sharded_feature_statistics_equal_one_process_to_1e_10(evaluated_on_two_ranks):
    features = torch.randn(37, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    whole = FeatureStats()
    whole.update(features)
    for rank_result in evaluated_on_two_ranks[0]:
        for num, mu, sigma in rank_result["statistics"].values():
            assert num == 37
            # float64 sums in another order: equal to rounding (measured: 2.7e-16 relative at most)
            np.testing.assert_allclose(mu, whole.mu, rtol=1e-10, atol=0)
            np.testing.assert_allclose(sigma, whole.sigma, rtol=1e-10, atol=1e-10 * np.abs(whole.sigma).max())


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(evaluated_on_two_ranks, monkeypatch):
    results, ref = evaluated_on_two_ranks
    ranks = [r["evaluate"] for r in results]
    monkeypatch.setattr(sfd.metrics.evaluate, "InceptionFeatures", PixelFeatures)
    single = evaluate_cases(SINGLE, ref)
    for rank_result in ranks:  # every rank gets rank 0's metrics
        # Each batch is the one-process batch, so the samples, and the metrics computed from them on rank 0 in
        # seed order, are bit-identical.
        assert rank_result["gap"] == single["gap"] and rank_result["digits"] == single["digits"]
        # FID's float64 sums add in another order (statistics ~3e-16 apart); 9 samples in 2048 dimensions give
        # a singular covariance whose square root amplifies that to a measured 2.8e-11 relative.
        assert rank_result["fid"].keys() == {"fid"}
        assert rank_result["fid"]["fid"] == pytest.approx(single["fid"]["fid"], rel=1e-9, abs=0)
    for name in ("gap", "digits", "fid"):
        np.testing.assert_array_equal(ranks[0][f"{name}/grid"], single[f"{name}/grid"])
        assert ranks[1][f"{name}/grid"] is None


@pytest.mark.slow
def test_ddp_training_matches_one_process(tmp_path):
    gmm, nan_grad, sfdv, diverge = (
        [r[case] for r in run_ranks(distill_cases, tmp_path)] for case in ("gmm", "nan_grad", "sfdv", "diverge"))
    single = train_gmm()  # one process, the whole batch of 8 in one pass
    for r in gmm:
        assert r["spread"] == 0.0  # DDP kept the ranks' weights identical
        # Each rank's micro-batches of 2 accumulate, then the two ranks' means are averaged: the one-process
        # gradient up to float32 summation order (measured: ~1e-7 relative).
        assert len(r["grads"]) == len(single["grads"]) == 2  # AFS, then two trained student steps
        for grad, ref in zip(r["grads"], single["grads"]):
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
        # Later iterations stay close: the logged loss is the global batch's (measured: up to 1.6e-5 relative
        # after 5 iterations; Adam's 1/sqrt(v) lets rounding in near-zero gradients move weights by part of a
        # step, so weights are not compared with the one-process run, only across ranks).
        assert [n for n, _ in r["seen"]] == [n for n, _ in single["seen"]]
        for (_, loss), (_, ref) in zip(r["seen"], single["seen"]):
            torch.testing.assert_close(loss, ref, rtol=1e-4, atol=0)
    # A NaN gradient on one rank reaches both through the all-reduce and is zeroed alike: same, finite weights.
    assert all(r["spread"] == 0.0 for r in nan_grad)
    assert all(torch.isfinite(v).all() for r in nan_grad for v in r["state"].values())
    # SFD-v: every rank draws the same N each iteration; the never-fed augmentation layer is frozen, not an error.
    assert sfdv[0]["steps"] == sfdv[1]["steps"] and len(set(sfdv[0]["steps"])) > 1
    assert sfdv[0]["frozen"] == sfdv[1]["frozen"] == ["model.map_augment.weight"]
    assert sfdv[0]["spread"] == 0.0
    # A NaN loss on rank 1 only stops both ranks at the same check (the losses are all-reduced).
    assert diverge == ["DivergedError: loss became non-finite by iteration 1"] * 2
