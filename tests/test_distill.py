import pytest
import torch

from distill_helpers import record_gradients
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


class Recorded(torch.nn.Module):
    """A student that records every call: its input, sigma, train mode and output."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, sigma, **kw):
        out = self.net(x, sigma, **kw)
        self.calls.append((x.detach().clone(), float(sigma), self.training, out.detach().clone()))
        return out


def test_student_steps_from_its_own_state_in_train_mode_on_fresh_noise():
    """Algorithm 2 (spec §6): each iteration draws new noise; the AFS step moves it analytically; every later
    student step starts from the student's own (detached) previous output, not the teacher's state; the
    student is in train mode throughout."""
    noises = []

    def teacher(x, sigma):
        if float(sigma) == 80.0:
            noises.append(x.clone())
        return MIX(x, sigma)

    student = Recorded(MLPDenoiser((2,)))
    d = Distiller(teacher, student, _settings())
    ts = d.grids(4)[1].tolist()
    d.run((2,))
    assert len(noises) == 3 and len(student.calls) == 6  # 3 iterations x 2 trained student steps
    assert not torch.equal(noises[0], noises[1]) and not torch.equal(noises[1], noises[2])
    assert all(training for _, _, training, _ in student.calls)
    for z, (x1, t1, _, d1), (x2, t2, _, _) in zip(noises, student.calls[::2], student.calls[1::2]):
        assert (t1, t2) == (ts[1], ts[2])
        torch.testing.assert_close(x1, z + (ts[1] - ts[0]) * z / (1 + ts[0] ** 2) ** 0.5)
        torch.testing.assert_close(x2, x1 + (ts[2] - ts[1]) * (x1 - d1) / ts[1])
        teacher_state = d.teacher_states(z, d.grids(4)[0], None)[8]
        assert (x2 - teacher_state).abs().max() > 1e-3  # the student's own state, not the teacher's


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward."""

    @staticmethod
    def forward(ctx, p):
        return p.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class NanGradientStudent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.extra = MLPDenoiser((2,)), torch.nn.Parameter(torch.zeros(2))

    def forward(self, x, sigma, **kw):
        return self.net(x, sigma, **kw) + _NanGradient.apply(self.extra)


def test_loop_turns_nan_gradients_to_zero_before_the_optimizer():
    """Spec §8's gradient guard inside the loop: a NaN gradient becomes 0, so Adam leaves that weight alone
    (unguarded, the weight would become NaN) while the others train."""
    student = NanGradientStudent()
    before = [p.detach().clone() for p in student.net.parameters()]
    distill(MIX, student, _settings(), (2,))
    assert student.extra.tolist() == [0.0, 0.0]
    after = list(student.net.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_conditional_student_keeps_dropout_but_never_sees_the_null_label():
    """Spec §11: distil with ω = 1, the conditional branch only. The teacher was trained with label dropout;
    the train-mode student keeps its ordinary dropout but not the label dropout."""
    from sfd.networks.edm import EDMPrecond

    torch.manual_seed(0)
    teacher = EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_type="SongUNet", model_channels=16,
                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.5, label_dropout=0.5)
    student = make_student(teacher)
    seen = []
    student.model.map_label.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    distill(teacher, student, _settings(num_classes=4, batch_size=16, total_kimg=0.032), (3, 8, 8))
    labels = torch.cat(seen)
    assert len(labels) == 2 * 2 * 16 and torch.all(labels.abs().sum(1) > 0)  # iterations x steps x batch
    x, sigma = torch.randn(2, 3, 8, 8), torch.full((2,), 1.0)
    onehot = torch.eye(4)[:2]
    assert student.training and not torch.equal(student(x, sigma, onehot), student(x, sigma, onehot))


@pytest.fixture
def tf32_switches():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("tf32", True), ("bf16", False)])
def test_precision_sets_the_tf32_switches(tf32_switches, precision, tf32):
    """fp32 is true float32 (the reference's numerics): cuDNN's default TF32 convolutions are switched off."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    Distiller(MIX, MLPDenoiser((2,)), _settings(precision=precision))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)


def test_gradient_flows_through_current_step_only():
    """The loop hands the next step a tensor with no autograd history, so a step's loss reaches the student's
    weights through that step alone."""
    d = Distiller(MIX, MLPDenoiser((2,)), _settings())
    z = torch.randn(4, 2) * 80
    target = torch.zeros(4, 2)
    (x_next,), _ = d.train_step([z], 80.0, 10.9, [target], [None], None, final=False)
    assert not x_next.requires_grad and x_next.grad_fn is None


def test_budget_in_kimg_gives_the_iterations_it_names():
    """ceil(kimg·1000 / batch): 200 kimg at batch 128 is 1563 iterations (spec §8); a budget that is a whole
    number of iterations is not pushed one over by floating point (16.1 kimg at batch 100 used to give 162)."""
    assert _settings(total_kimg=200, batch_size=128).total_iterations == 1563
    assert _settings(total_kimg=16.1, batch_size=100).total_iterations == 161
    assert _settings(total_kimg=16.1001, batch_size=100).total_iterations == 162


def test_lr_halves_budget_decay_and_gradient_guard():
    """10 iterations of 32: half the budget is 160 trajectories; the reference checks the trajectories seen
    before the iteration that just finished, (k - 1)·32 >= 160, so iteration 6 is the first at lr / 10."""
    s = _settings(total_kimg=0.032 * 10)
    d = Distiller(MIX, MLPDenoiser((2,)), s)
    assert [d.lr_at(i) for i in (0, 4, 5, 6, 9)] == [1e-3, 1e-3, 1e-3, 1e-4, 1e-4]
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
    (_, xt, grid), (_, (xs,), t) = starts
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


@pytest.mark.parametrize("schedule,rho", [("logsnr", 7.0), ("polynomial", 3.0), ("time_uniform", 2.0)])
def test_grids_use_the_student_grid_family_endpoints_and_rho(schedule, rho):
    """Spec §5: the teacher grid is (m+1)(N-1)+1 points of the student grid's own family, endpoints and rho;
    the student grid is every (m+1)-th of them, i.e. the N-point grid of that family."""
    from sfd.schedules import get_schedule

    grid = GridSpec(num_steps=4, afs=True, schedule=schedule, t_min=0.01, t_max=40.0, rho=rho)
    d = Distiller(MIX, MLPDenoiser((2,)), _settings(grid=grid, m=2))
    for n in (4, 5):
        teacher_grid, student_grid = d.grids(n)
        assert torch.equal(teacher_grid, get_schedule(schedule, 3 * (n - 1) + 1, 0.01, 40.0, rho))
        torch.testing.assert_close(student_grid, get_schedule(schedule, n, 0.01, 40.0, rho), rtol=1e-12, atol=0)


def test_lr_decays_once_half_the_budget_is_spent_for_an_odd_budget():
    """5 iterations of 32 (half: 80 trajectories): iteration k is at lr / 10 iff (k - 1)·32 >= 80, i.e. from
    k = 4 (the reference lowers lr after iteration 3, which started with 96 seen)."""
    d = Distiller(MIX, MLPDenoiser((2,)), _settings(total_kimg=0.032 * 5))
    assert d.s.total_iterations == 5
    assert [d.lr_at(i) for i in range(5)] == [1e-3, 1e-3, 1e-3, 1e-3, 1e-4]


def test_lr_decays_from_iteration_783_at_the_papers_budget():
    """Spec §14: 200 kimg at batch 128 (1563 iterations). The reference's loop sets lr / 10 at the end of an
    iteration when the images seen before it, cur_nimg, reach 100,000: after iteration 782 (cur_nimg =
    782·128 = 100,096), so iteration 783 is the first at lr / 10 and 782 (781·128 = 99,968 seen) is not."""
    d = Distiller(MIX, MLPDenoiser((2,)), _settings(total_kimg=200, batch_size=128))
    assert d.s.total_iterations == 1563
    assert [d.lr_at(i) for i in (0, 1, 781, 782)] == [1e-3] * 4
    assert [d.lr_at(i) for i in (783, 784, 1562)] == [1e-4] * 3
    # a run decays exactly once: the lr sequence steps down at one index
    lrs = [d.lr_at(i) for i in range(d.s.total_iterations)]
    assert sum(a != b for a, b in zip(lrs, lrs[1:])) == 1 and lrs.index(1e-4) == 783


def test_a_tiny_positive_budget_is_still_one_iteration():
    assert _settings(total_kimg=1e-9, batch_size=128).total_iterations == 1


@pytest.mark.parametrize("micro", [8, 12, 1])
def test_accumulated_iteration_equals_the_full_batch(micro):
    """Micro-batches (12 leaves a ragged 8 at batch 32) carry the same trajectories as the whole batch, and
    each student step's gradient, summed over them with weights size/batch, is the full batch's: equal at every
    optimizer step, as are the per-step losses."""
    def run(micro_batch_size):
        d = Distiller(MIX, MLPDenoiser((2,)), _settings(micro_batch_size=micro_batch_size, seed=5))
        return record_gradients(d, (2,))

    torch.manual_seed(0)
    full_grads, full_losses = run(None)
    torch.manual_seed(0)  # same student initialisation
    acc_grads, acc_losses = run(micro)
    assert len(full_grads) == len(acc_grads) == 2
    torch.testing.assert_close(acc_losses, full_losses, rtol=1e-5, atol=1e-6)
    for full, acc in zip(full_grads, acc_grads):
        torch.testing.assert_close(acc, full, rtol=1e-4, atol=1e-6 * float(full.abs().max()))


def test_micro_batch_must_fit_the_batch():
    with pytest.raises(ValueError, match="micro_batch_size"):
        _settings(micro_batch_size=64).validate()
    with pytest.raises(ValueError, match="micro_batch_size"):
        _settings(micro_batch_size=0).validate()
