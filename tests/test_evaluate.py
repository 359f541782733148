import pytest
import torch

from sfd.metrics.evaluate import evaluate, solver_sampler, student_sampler
from sfd.metrics.gap import per_sample_rmse, reference_grid
from sfd.sampling import GridSpec
from sfd.solvers import nfe
from sfd.teachers import get_teacher


@pytest.fixture(scope="module")
def gmm():
    return get_teacher("gmm-img-4")


def test_solver_sampler_costs_the_asked_nfe(gmm):
    for solver, n, afs in [("euler", 5, False), ("heun", 10, False), ("dpm2", 5, True), ("dpmpp3m", 4, True)]:
        s = solver_sampler(gmm.net, solver, n, afs=afs)
        assert s.nfe == n == nfe(solver, s.grid.num_steps, afs)
    assert student_sampler(gmm.net, GridSpec(num_steps=4, afs=True), guidance=2.0, num_classes=10).nfe == 4


def test_teacher_gap_is_zero_for_the_reference_itself_and_shrinks_with_nfe(gmm):
    ref = reference_grid(GridSpec(t_min=0.006))
    exact = solver_sampler(gmm.net, "dpmpp3m", ref.num_steps - 1, t_min=0.006, solver_opts={"thresholding": False})
    r = evaluate(exact, gmm, ["teacher_gap"], 16, progress=False)
    assert r.metrics["teacher_gap_mean"] == pytest.approx(0.0, abs=1e-6)
    coarse = evaluate(solver_sampler(gmm.net, "dpmpp3m", 5, t_min=0.006), gmm, ["teacher_gap"], 64, progress=False)
    fine = evaluate(solver_sampler(gmm.net, "dpmpp3m", 20, t_min=0.006), gmm, ["teacher_gap"], 64, progress=False)
    assert fine.metrics["teacher_gap_mean"] < 0.5 * coarse.metrics["teacher_gap_mean"]
    assert r.grid_image.size[0] > 8 and r.num_samples == 16


def test_results_do_not_depend_on_batch_size(gmm):
    s = solver_sampler(gmm.net, "heun", 6)
    a = evaluate(s, gmm, ["teacher_gap"], 20, batch_size=20, progress=False).metrics
    b = evaluate(s, gmm, ["teacher_gap"], 20, batch_size=3, progress=False).metrics
    assert a == pytest.approx(b, abs=1e-9)


def test_shared_reference_cache_solves_each_reference_once_and_changes_nothing(gmm, monkeypatch):
    import sfd.metrics.evaluate as ev

    calls = []
    real = ev.teacher_reference
    monkeypatch.setattr(ev, "teacher_reference", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    samplers = [solver_sampler(gmm.net, "euler", n, t_min=0.006) for n in (3, 6)]
    cache = {}
    shared = [evaluate(s, gmm, ["teacher_gap"], 12, batch_size=8, progress=False, reference_cache=cache).metrics
              for s in samplers]
    assert len(calls) == 2  # two batches of seeds, solved for the first sampler only
    alone = [evaluate(s, gmm, ["teacher_gap"], 12, batch_size=8, progress=False).metrics for s in samplers]
    assert shared == alone and len(calls) == 6
    other_end = solver_sampler(gmm.net, "euler", 3, t_min=0.05)  # a different end time needs its own reference
    evaluate(other_end, gmm, ["teacher_gap"], 12, batch_size=8, progress=False, reference_cache=cache)
    assert len(calls) == 8 and len(cache) == 4


def test_per_sample_rmse():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([[1.0, 1, 1, 1], [2.0, 0, 0, 0]]).reshape(2, 1, 2, 2)
    assert per_sample_rmse(a, b).tolist() == pytest.approx([1.0, 1.0])


def test_metric_checks(gmm):
    s = solver_sampler(gmm.net, "euler", 4)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(s, gmm, ["is"], 4)
    with pytest.raises(ValueError, match="digits"):
        evaluate(s, gmm, ["fd_digits"], 4)
    with pytest.raises(ValueError, match="digits"):
        evaluate(s, gmm, ["class_accuracy"], 4)


def test_unknown_teacher_is_named():
    with pytest.raises(ValueError, match="unknown teacher"):
        get_teacher("cifar100")


def test_samples_that_diverged_are_an_error_not_a_score(gmm):
    """clamp keeps NaN and the uint8 conversion would turn it into a black pixel, so FID would score a
    diverged sampler as a (bad) number: any non-finite sample fails the evaluation, saying how many."""
    from sfd.metrics.evaluate import NonFiniteSamplesError

    def diverging(x, sigma):
        out = gmm.net(x, sigma).clone()
        out[1::4] = float("nan")  # every fourth sample from the second
        return out

    with pytest.raises(NonFiniteSamplesError, match="3 of 10 samples contain NaN or inf"):
        evaluate(solver_sampler(diverging, "euler", 3), gmm, ["teacher_gap"], 10, batch_size=4, progress=False)
