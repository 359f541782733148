import pytest
import torch

from sfd.distill import DistillSettings, Distiller, DivergedError, distill, make_student
from sfd.networks.mlp import MLPDenoiser
from sfd.sampling import GridSpec
from sfd.solvers import solve
from sfd.teachers import GaussianMixture

MIX = GaussianMixture.random(4, (2,), spread=0.7, std=0.08, seed=3)


def _settings(**kw):
    base = dict(grid=GridSpec(num_steps=4, afs=True), teacher_solver="dpmpp3m", m=3, loss="l2", lr=1e-3,
                batch_size=32, total_kimg=0.032 * 3, teacher_opts={"thresholding": False})
    base.update(kw)
    return DistillSettings(**base)


class CountingAdam(torch.optim.Adam):
    steps = 0

    def step(self, closure=None):
        CountingAdam.steps += 1
        return super().step(closure)


@pytest.mark.parametrize("solver,opts", [
    ("heun", {}), ("dpm2", {}), ("dpmpp3m", {"thresholding": False, "lower_order_final": False}),
])
def test_teacher_grid_targets_match_direct_solve(solver, opts):
    """Targets are the states of one uninterrupted trajectory at every (m+1)-th refined timestamp, equal to
    solving directly to each of those timestamps (a multistep solver without lower_order_final does not
    look ahead, so the truncated solve is the same computation)."""
    d = Distiller(MIX, MLPDenoiser((2,)), _settings(teacher_solver=solver, teacher_opts=opts))
    teacher_grid, student_grid = d.grids(4)
    assert len(teacher_grid) == 13
    assert torch.equal(student_grid, teacher_grid[::4])
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) * 80
    states = d.teacher_states(z, teacher_grid, None)
    for i in range(1, 4):
        direct = solve(solver, MIX, z, teacher_grid[: 4 * i + 1], **opts)
        torch.testing.assert_close(states[4 * i], direct, rtol=0, atol=1e-6)


def test_teacher_keeps_multistep_history_across_student_timestamps():
    """The DPM++(3M) teacher runs one solve over the refined grid: restarting it at each student timestamp
    (dropping its history, as a per-segment solve would) gives other targets, and the loop does not."""
    d = Distiller(MIX, MLPDenoiser((2,)), _settings())
    teacher_grid, _ = d.grids(4)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) * 80
    states = d.teacher_states(z, teacher_grid, None)
    x, restarted = z, [z]
    for i in range(3):
        x = solve("dpmpp3m", MIX, x, teacher_grid[4 * i: 4 * i + 5], thresholding=False)
        restarted.append(x)
    full = solve("dpmpp3m", MIX, z, teacher_grid, return_trajectory=True, thresholding=False)
    torch.testing.assert_close(states, full)
    for i in (2, 3):
        assert (states[4 * i] - restarted[i]).abs().max() > 1e-4


def test_optimizer_steps_equal_non_afs_student_steps(monkeypatch):
    for afs, expected_per_iter in [(True, 2), (False, 3)]:
        monkeypatch.setattr(torch.optim, "Adam", CountingAdam)
        CountingAdam.steps = 0
        seen = []
        distill(MIX, MLPDenoiser((2,)), _settings(grid=GridSpec(num_steps=4, afs=afs)), (2,),
                callback=lambda s: seen.append(s))
        assert CountingAdam.steps == 3 * expected_per_iter
        assert [len(s.step_losses) for s in seen] == [expected_per_iter] * 3
        assert all(s.step_indices == tuple(range(3 - expected_per_iter, 3)) for s in seen)


def test_gradient_flows_through_current_step_only():
    """The student's input state must be detached: a previous step cannot receive gradient."""
    student = MLPDenoiser((2,))
    d = Distiller(MIX, student, _settings())
    x_prev = torch.randn(4, 2, requires_grad=True)
    x_in = (x_prev * 2.0).detach()
    out = d.student_step(x_in, 10.9, 0.67, None, None)
    out.sum().backward()
    assert x_prev.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # And the loop itself hands the next step a tensor with no autograd history.
    z = torch.randn(4, 2) * 80
    target = torch.zeros(4, 2)
    x_next, _ = d.train_step(z, 80.0, 10.9, target, None, None, final=False)
    assert not x_next.requires_grad and x_next.grad_fn is None


def test_lr_halves_budget_decay_and_gradient_guard():
    s = _settings(total_kimg=0.032 * 10)
    d = Distiller(MIX, MLPDenoiser((2,)), s)
    assert [d.lr_at(i) for i in (0, 4, 5, 9)] == [1e-3, 1e-3, 1e-4, 1e-4]
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([float("nan"), float("inf"), -float("inf")])
    from sfd.distill import sanitize_gradients
    sanitize_gradients([p])
    assert p.grad.tolist() == [0.0, 1e5, -1e5]


def _fixed_batch_loss(student, settings):
    d = Distiller(MIX, student, settings)
    d.shape = (2,)
    d.gen.manual_seed(1234)
    teacher_grid, student_grid = d.grids(4)
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(7)) * 80
    targets = d.teacher_states(z, teacher_grid, None)[::4]
    ts = student_grid.tolist()
    with torch.no_grad():
        x = z + (ts[1] - ts[0]) * z / (1 + ts[0] ** 2) ** 0.5
        total = 0.0
        for n in (1, 2):
            x = d.student_step(x, ts[n], ts[n + 1], None, None)
            total += float(((x - targets[n + 1]) ** 2).sum(1).mean())
    return total


def test_sfd_loss_drops_on_mixture_teacher():
    torch.manual_seed(0)
    student = MLPDenoiser((2,), hidden=64)
    settings = _settings(total_kimg=0.032 * 300, lr=2e-3)
    before = _fixed_batch_loss(student, settings)
    distill(MIX, student, settings, (2,))
    after = _fixed_batch_loss(student.eval(), settings)
    assert after < 0.3 * before, (before, after)


def test_vanilla_with_data_and_data_free():
    data = [MIX.sample(32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    seen = []
    distill(MIX, MLPDenoiser((2,)), _settings(algorithm="vanilla", grid=GridSpec(num_steps=4, afs=False)), (2,),
            data=data, callback=seen.append)
    assert len(seen) == 3 and all(len(s.step_losses) == 1 for s in seen)
    assert all(len(s.step_indices) == 1 and 0 <= s.step_indices[0] <= 2 for s in seen)
    seen.clear()
    distill(MIX, MLPDenoiser((2,)), _settings(algorithm="vanilla", vanilla_data_free=True), (2,),
            callback=seen.append)
    assert len(seen) == 3 and all(torch.isfinite(s.step_losses).all() for s in seen)


def test_vanilla_student_and_teacher_start_from_same_point():
    d = Distiller(MIX, MLPDenoiser((2,)), _settings(algorithm="vanilla", grid=GridSpec(num_steps=4, afs=False)),
                  data=[MIX.sample(8)])
    d.shape = (2,)
    starts = []
    orig_teacher, orig_train = d.teacher_states, d.train_step
    d.teacher_states = lambda x, grid, labels: (starts.append(("t", x, grid)), orig_teacher(x, grid, labels))[1]
    d.train_step = lambda x, t, tn, target, labels, step, final: (starts.append(("s", x, t)), orig_train(
        x, t, tn, target, labels, step, final))[1]
    d.vanilla_iteration(4)
    (_, xt, grid), (_, xs, t) = starts
    assert torch.equal(xt, xs) and float(grid[0]) == t and len(grid) == 5


def test_sfd_v_draws_grids_and_passes_step():
    calls = []

    class StepNet(MLPDenoiser):
        def forward(self, x, sigma, labels=None, step=None):
            calls.append(step)
            return super().forward(x, sigma)

    seen = []
    distill(MIX, StepNet((2,)), _settings(num_steps_choices=(4, 5, 6, 7), total_kimg=0.032 * 8), (2,),
            callback=seen.append)
    assert {s.num_steps for s in seen} <= {4, 5, 6, 7} and len({s.num_steps for s in seen}) > 1
    assert all(len(s.step_losses) == s.num_steps - 2 for s in seen)
    assert set(calls) == {s.num_steps for s in seen}


def test_divergence_is_reported():
    class Exploding(MLPDenoiser):
        def forward(self, x, sigma, labels=None, step=None):
            return super().forward(x, sigma) * float("nan")

    try:
        distill(MIX, Exploding((2,)), _settings(nan_check_every=1), (2,))
    except DivergedError as e:
        assert "non-finite" in str(e)
    else:
        raise AssertionError("a NaN loss must stop the run")


def test_make_student_copies_and_trains():
    teacher = MLPDenoiser((2,), dropout=0.1).eval().requires_grad_(False)
    student = make_student(teacher)
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert not teacher.training and student is not teacher
    x = torch.randn(3, 2)
    torch.testing.assert_close(student.eval()(x, 1.0), teacher(x, 1.0))


def test_bad_settings_fail_before_work():
    for kw, match in [({"algorithm": "nope"}, "algorithm"), ({"teacher_solver": "rk4"}, "unknown solver"),
                      ({"grid": GridSpec(num_steps=2, afs=True)}, "AFS needs"),
                      ({"grid": GridSpec(t_min=90.0)}, "t_min")]:
        with pytest.raises(ValueError, match=match):
            Distiller(MIX, MLPDenoiser((2,)), _settings(**kw))
    with pytest.raises(ValueError, match="data source"):
        Distiller(MIX, MLPDenoiser((2,)), _settings(algorithm="vanilla"))
