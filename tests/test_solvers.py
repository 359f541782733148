import math

import pytest
import torch

from sfd.schedules import get_schedule
from sfd.solvers import (
    SOLVERS, afs_derivative, dpmpp_order, dpmpp_update, dynamic_threshold, ipndm_update, nfe,
    num_steps_for_nfe, solve,
)
from sfd.teachers import GaussianMixture

GAUSS = GaussianMixture.single(torch.tensor([0.3, -0.2]), 0.5)


class CountingDenoiser:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.inner(x, sigma)


def _noise(n=16, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 80.0


def _global_slopes(name, steps, schedule="polynomial", **opts):
    x = _noise()
    exact = GAUSS.single_gaussian_flow(x, 80.0, 0.006)
    errs = [(solve(name, GAUSS, x, get_schedule(schedule, n, 0.006, 80.0), **opts) - exact).abs().max().item()
            for n in steps]
    return [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpm2", 2)])
def test_one_step_solvers_converge_with_their_order(name, order):
    slopes = _global_slopes(name, [32, 64, 128, 256])
    assert slopes[-1] == pytest.approx(order, abs=0.1), slopes


@pytest.mark.parametrize("name,opts", [("ipndm", {}), ("dpmpp3m", {"thresholding": False})])
def test_multistep_solvers_converge_globally(name, opts):
    """Measured global slopes tend to 2 from above: a multistep method started with an Euler step carries
    that step's O(h^2) error to the end, iPNDM's fixed coefficients are exact only on uniform steps, and
    the 3M update is second order (see the local test). Coarser grids show the higher-order terms."""
    slopes = _global_slopes(name, [16, 32, 64, 128, 256], schedule="logsnr", **opts)
    assert all(s > 1.95 for s in slopes), slopes
    assert slopes[0] > 2.1, slopes


def _exact_state(x_start, t):
    return GAUSS.single_gaussian_flow(x_start, 80.0, t)


def _local_error_dpmpp(h, order, t0=2.0):
    """One multistep update from exact history (uniform lambda-steps h) vs the exact solution."""
    x_start = _noise(seed=1)
    ts = [t0 * math.exp(-h * k) for k in range(order + 1)]  # t_{-order+1} ... t_1
    hist = [GAUSS(_exact_state(x_start, t), t) for t in ts[:order]][::-1]  # newest first
    x = _exact_state(x_start, ts[order - 1])
    x_next = dpmpp_update(x, ts[order - 1], ts[order], hist, [h] * (order - 1), order)
    return (x_next - _exact_state(x_start, ts[order])).abs().max().item()


def test_dpmpp_update_local_truncation_order():
    """Order 2 has local error O(h^3). The spec's order-3 update (the published DPM-Solver++(3M) formula,
    D2 = (D1_0 - D1_1)/(r0 + r1) with phi3 = phi2/h - 1/2) supplies half of the exact second-derivative
    term, so its local error is also O(h^3), with a smaller constant. Measured, not assumed: a correct
    third-order term would show slopes near 4 here."""
    hs = (0.2, 0.1, 0.05, 0.025)
    err2 = [_local_error_dpmpp(h, 2) for h in hs]
    err3 = [_local_error_dpmpp(h, 3) for h in hs]
    slope = lambda e: math.log2(e[-2] / e[-1])  # noqa: E731
    assert slope(err2) == pytest.approx(3.0, abs=0.15)
    assert slope(err3) == pytest.approx(3.0, abs=0.15)
    assert all(e3 < 0.5 * e2 for e2, e3 in zip(err2, err3)), (err2, err3)


def _local_error_ipndm(dt, order, t0=3.0):
    x_start = _noise(seed=2)
    ts = [t0 - dt * k for k in range(order + 1)]
    derivs = [(lambda xs, t: (xs - GAUSS(xs, t)) / t)(_exact_state(x_start, t), t) for t in ts[:order]][::-1]
    x_next = ipndm_update(_exact_state(x_start, ts[order - 1]), ts[order - 1], ts[order], derivs, order)
    return (x_next - _exact_state(x_start, ts[order])).abs().max().item()


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_update_local_truncation_order(order):
    errs = [_local_error_ipndm(dt, order) for dt in (0.2, 0.1, 0.05)]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert min(slopes) > order + 0.6, slopes


def test_dpmpp_order_schedule():
    orders = [dpmpp_order(i, 13, 3, True) for i in range(12)]
    assert orders == [1, 2] + [3] * 8 + [2, 1]
    assert [dpmpp_order(i, 13, 3, False) for i in range(12)] == [1, 2] + [3] * 10
    assert [dpmpp_order(i, 3, 3, True) for i in range(2)] == [1, 2]


def test_dynamic_threshold():
    d = torch.tensor([[0.5, -0.2, 0.1, 0.3]])
    torch.testing.assert_close(dynamic_threshold(d), d)  # s = max(q, 1) = 1: in-range data unchanged
    big = torch.linspace(-4, 4, 1001)[None]
    out = dynamic_threshold(big)
    s = torch.quantile(big.abs(), 0.995).item()
    assert out.abs().max().item() == pytest.approx(1.0)
    torch.testing.assert_close(out[0, 500 + 10], big[0, 510] / s)


@pytest.mark.parametrize("name,first_step_calls", [
    ("euler", 0), ("ipndm", 0), ("dpmpp3m", 0), ("heun", 1), ("dpm2", 1),
])
def test_afs_first_step_calls(name, first_step_calls):
    grid = get_schedule("polynomial", 4, 0.006, 80.0)
    counter = CountingDenoiser(GAUSS)
    solve(name, counter, _noise(), grid[:2].tolist() + [float(grid[1]) * 0.5], afs=True)
    total_with_afs = counter.calls
    counter.calls = 0
    solve(name, counter, _noise(), grid[:2].tolist() + [float(grid[1]) * 0.5], afs=False)
    per_step = total_with_afs - (counter.calls - counter.calls // 2)
    assert per_step == first_step_calls
    assert total_with_afs == nfe(name, 3, afs=True)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_nfe_counts_denoiser_calls(name):
    for n, afs in [(4, False), (4, True), (7, True)]:
        counter = CountingDenoiser(GAUSS)
        solve(name, counter, _noise(), get_schedule("polynomial", n, 0.006, 80.0), afs=afs)
        assert counter.calls == nfe(name, n, afs)
        assert num_steps_for_nfe(name, nfe(name, n, afs), afs) == n


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_afs_first_step_matches_formula(name):
    """With AFS, the first state for a one-evaluation solver is x + (t1 - t0) x / sqrt(1 + t0^2)."""
    x = _noise()
    ts = get_schedule("polynomial", 4, 0.006, 80.0)
    traj = solve(name, GAUSS, x, ts, afs=True, return_trajectory=True)
    assert traj.shape == (4, *x.shape)
    t0, t1 = float(ts[0]), float(ts[1])
    expected_euler = x + (t1 - t0) * x / math.sqrt(1 + t0**2)
    if name in ("euler", "ipndm", "dpmpp3m"):
        torch.testing.assert_close(traj[1], expected_euler)
    elif name == "heun":
        d_corr = (expected_euler - GAUSS(expected_euler, t1)) / t1
        torch.testing.assert_close(traj[1], x + (t1 - t0) * 0.5 * (afs_derivative(x, t0) + d_corr))
    else:
        tm = math.sqrt(t0 * t1)
        xm = x + (tm - t0) * afs_derivative(x, t0)
        torch.testing.assert_close(traj[1], x + (t1 - t0) * (xm - GAUSS(xm, tm)) / tm)


def test_solve_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown solver"):
        solve("rk45", GAUSS, _noise(), [80.0, 1.0])
    with pytest.raises(ValueError, match="AFS needs"):
        solve("euler", GAUSS, _noise(), [80.0, 1.0], afs=True)
    with pytest.raises(ValueError, match="no grid"):
        num_steps_for_nfe("heun", 3, afs=False)


# ----- golden values and spec-literal references (mutation sweep: each test below kills a wrong variant of the
# solver math that the convergence tests above cannot see, e.g. anything invisible on uniform lambda-steps) ---------

# A wide mixture on 6-d points: its predictions leave [-1, 1] often, so dynamic thresholding really acts.
WIDE = GaussianMixture.random(3, (6,), spread=2.0, std=0.6, seed=5)


def _spec_threshold(D):
    """Spec §3 written out: s = max(quantile_0.995(|D|) per sample, 1); D <- clamp(D, -s, s) / s."""
    s = torch.quantile(D.abs().flatten(1), 0.995, dim=1).clamp(min=1.0).reshape(-1, *[1] * (D.ndim - 1))
    return torch.clamp(D, -s, s) / s


def _spec_dpmpp3m(denoiser, x, ts, afs=False, thresholding=True, lower_order_final=True):
    """Spec §3/§4 DPM-Solver++(3M) indexed by absolute step (no newest-first buffers), lambda = -ln t."""
    lam = [-math.log(t) for t in ts]
    Ds, states = [], [x]
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        D = x - t * (x / math.sqrt(1 + t * t)) if afs and i == 0 else denoiser(x, t)
        Ds.append(_spec_threshold(D) if thresholding else D)
        order = i + 1 if i + 1 < 3 else (min(3, len(ts) - (i + 1)) if lower_order_final else 3)
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)
        x_next = (tn / t) * x - phi1 * Ds[i]
        if order >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            D1_0 = (Ds[i] - Ds[i - 1]) / r0
        if order == 2:
            x_next = x_next - 0.5 * phi1 * D1_0
        elif order == 3:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            D1_1 = (Ds[i - 1] - Ds[i - 2]) / r1
            D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            x_next = x_next + phi2 * D1 - phi3 * D2
        x = x_next
        states.append(x)
    return torch.stack(states)


def _spec_ipndm(denoiser, x, ts, afs=False, max_order=4):
    """Spec §3/§4 iPNDM: Adams–Bashforth with the printed coefficients, derivatives indexed by absolute step."""
    ds, states = [], [x]
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        ds.append(x / math.sqrt(1 + t * t) if afs and i == 0 else (x - denoiser(x, t)) / t)
        order = min(max_order, i + 1)
        if order == 1:
            slope = ds[i]
        elif order == 2:
            slope = (3 * ds[i] - ds[i - 1]) / 2
        elif order == 3:
            slope = (23 * ds[i] - 16 * ds[i - 1] + 5 * ds[i - 2]) / 12
        else:
            slope = (55 * ds[i] - 59 * ds[i - 1] + 37 * ds[i - 2] - 9 * ds[i - 3]) / 24
        x = x + (tn - t) * slope
        states.append(x)
    return torch.stack(states)


def _wide_noise(t0, n=8, seed=3):
    """A noisy state at t0: WIDE data plus t0 times unit noise."""
    g = torch.Generator().manual_seed(seed)
    return WIDE.sample(n, generator=g).double() + t0 * torch.randn(n, 6, generator=g, dtype=torch.float64)


# Polynomial grids have non-uniform lambda-steps (r0, r1 != 1); t_max = 0.5 makes the AFS prediction
# D0 = x (1 - t0 / sqrt(1 + t0^2)) large enough to be thresholded. N = 4, 5 exercise the short order schedules.
_GOLDEN_GRIDS = [(4, 0.006, 80.0), (5, 0.006, 80.0), (9, 0.006, 80.0), (9, 0.02, 0.5), (6, 0.05, 2.5)]


@pytest.mark.parametrize("n,t_min,t_max", _GOLDEN_GRIDS)
@pytest.mark.parametrize("afs", [False, True])
def test_dpmpp3m_defaults_match_spec_formulas_on_nonuniform_steps(n, t_min, t_max, afs):
    """Default dpmpp3m (thresholding on, q = 0.995, lower_order_final on, max_order 3) equals the spec written
    out, step for step."""
    ts = get_schedule("polynomial", n, t_min, t_max).tolist()
    x = _wide_noise(t_max)
    got = solve("dpmpp3m", WIDE, x, ts, afs=afs, return_trajectory=True)
    torch.testing.assert_close(got, _spec_dpmpp3m(WIDE, x, ts, afs=afs), rtol=1e-10, atol=1e-10)
    off = dict(thresholding=False, lower_order_final=False)
    torch.testing.assert_close(solve("dpmpp3m", WIDE, x, ts, afs=afs, return_trajectory=True, **off),
                               _spec_dpmpp3m(WIDE, x, ts, afs=afs, **off), rtol=1e-10, atol=1e-10)


def test_golden_grids_really_threshold():
    """Guard for the test above: on these grids thresholding changes the result (else it would prove nothing)."""
    ts = get_schedule("polynomial", 9, 0.02, 0.5).tolist()
    x = _wide_noise(0.5)
    on = _spec_dpmpp3m(WIDE, x, ts, afs=True)
    assert (on - _spec_dpmpp3m(WIDE, x, ts, afs=True, thresholding=False)).abs().max() > 1e-2
    D0 = x - 0.5 * x / math.sqrt(1 + 0.5**2)
    assert (_spec_threshold(D0) - D0).abs().max() > 1e-2  # the AFS prediction itself is thresholded


@pytest.mark.parametrize("n,t_min,t_max", _GOLDEN_GRIDS)
@pytest.mark.parametrize("afs", [False, True])
def test_ipndm_matches_spec_coefficients_and_warm_up(n, t_min, t_max, afs):
    """Orders 1, 2, 3, 4, 4, ... with the printed coefficients; with AFS the analytical d0 is the history's
    first entry, so the second step is already order 2."""
    ts = get_schedule("polynomial", n, t_min, t_max).tolist()
    x = _wide_noise(t_max)
    got = solve("ipndm", WIDE, x, ts, afs=afs, return_trajectory=True)
    torch.testing.assert_close(got, _spec_ipndm(WIDE, x, ts, afs=afs), rtol=1e-10, atol=1e-10)


def test_ipndm_afs_derivative_enters_the_history():
    """Hand-written second step: x2 = x1 + (t2 - t1)(3 d1 - d0)/2 with d0 = x0 / sqrt(1 + t0^2)."""
    ts = [2.0, 1.0, 0.5]
    x0 = _noise(4, seed=5) / 40
    traj = solve("ipndm", GAUSS, x0, ts, afs=True, return_trajectory=True)
    d0 = x0 / math.sqrt(5.0)
    x1 = x0 - d0
    d1 = x1 - GAUSS(x1, 1.0)
    torch.testing.assert_close(traj[1], x1)
    torch.testing.assert_close(traj[2], x1 - 0.5 * (3 * d1 - d0) / 2)


def test_dpmpp3m_is_exact_after_its_first_step_for_predictions_linear_in_log_t():
    """An analytic golden independent of the update formulas. If D(x, t) = a + b ln t (linear in lambda),
    dx/dt = (x - D)/t is solved by x = D(t) + b + C t. The order-1 and order-2 warm-up steps are not exact
    for it (2M uses -phi1/2 for the exact phi1 + h), but an order-3 step integrates a linear-in-lambda D
    exactly on any grid (D1 = h dD/dlambda, D2 = 0), so from x2 on every state keeps (x - D(t) - b)/t
    constant. Non-uniform steps make r0, r1 != 1 and test the history bookkeeping."""
    a, b = torch.tensor([0.3, -0.7], dtype=torch.float64), 0.25

    def D(x, t):
        return (a + b * math.log(t)).expand_as(x)

    for ts in (get_schedule("polynomial", 10, 0.006, 80.0).tolist(), [5.0, 3.0, 2.5, 1.0, 0.7, 0.2, 0.15, 0.01]):
        x0 = _noise(4, seed=6)
        traj = solve("dpmpp3m", D, x0, ts, thresholding=False, lower_order_final=False, return_trajectory=True)
        t0, t1 = ts[0], ts[1]
        torch.testing.assert_close(traj[1], D(x0, t0) + (t1 / t0) * (x0 - D(x0, t0)))  # order 1, constant D
        c = (traj[2] - D(x0, ts[2]) - b) / ts[2]
        for x, t in zip(traj[3:], ts[3:]):
            torch.testing.assert_close(x, D(x0, t) + b + c * t, rtol=1e-9, atol=1e-9)


def test_dpmpp3m_thresholds_by_default_with_the_spec_quantile():
    """Golden by hand. D(x, t) = c, a fixed vector: every difference term vanishes, so each step gives
    x' - c^ = (t'/t)(x - c^) and the end state is c^ + (t_min/t_max)(x0 - c^), c^ the thresholded c.
    c = linspace(-4, 4, 1001): sorted |c| is 0, then 0.008k twice for k = 1..500; the 0.995 quantile sits at
    position 0.995 * 1000 = 995, the value 0.008 * 498 = 3.984 (0.99 would give 3.96)."""
    c = torch.linspace(-4, 4, 1001, dtype=torch.float64)[None]
    x0 = _noise(2, seed=9).repeat(1, 501)[:, :1001]
    ts = get_schedule("polynomial", 7, 0.006, 80.0)
    ratio = 0.006 / 80.0
    c_hat = c.clamp(-3.984, 3.984) / 3.984
    torch.testing.assert_close(solve("dpmpp3m", lambda x, t: c.expand_as(x), x0, ts), c_hat + ratio * (x0 - c_hat))
    torch.testing.assert_close(solve("dpmpp3m", lambda x, t: c.expand_as(x), x0, ts, thresholding=False),
                               c + ratio * (x0 - c))


def test_dynamic_threshold_scale_is_per_sample():
    """s is one quantile per sample: an in-range sample is untouched next to one that is scaled down."""
    d = torch.tensor([[0.5, -0.2, 0.1, 0.3], [2.0, -2.0, 2.0, -2.0]])
    out = dynamic_threshold(d)
    torch.testing.assert_close(out[0], d[0])
    torch.testing.assert_close(out[1], torch.tensor([1.0, -1.0, 1.0, -1.0]))
    img = torch.stack([torch.full((3, 2, 2), 0.25), torch.full((3, 2, 2), -8.0)])  # C×H×W samples
    torch.testing.assert_close(dynamic_threshold(img), torch.stack([img[0], torch.full((3, 2, 2), -1.0)]))


def test_dpmpp_order_schedule_on_short_grids():
    """Spec §3: order_i = i+1 while i+1 < max_order, else min(max_order, N - (i+1)). SFD's own 4-point grid
    is 1, 2, 1 (the second-order warm-up is not promoted to 3 on the last step)."""
    assert [dpmpp_order(i, 4, 3, True) for i in range(3)] == [1, 2, 1]
    assert [dpmpp_order(i, 5, 3, True) for i in range(4)] == [1, 2, 2, 1]
    assert [dpmpp_order(i, 6, 3, True) for i in range(5)] == [1, 2, 3, 2, 1]
    assert [dpmpp_order(i, 3, 2, True) for i in range(2)] == [1, 1]


def test_num_steps_for_nfe_rejects_grids_too_short():
    """A grid has at least 2 timestamps, and AFS needs at least 3: 0 NFE has no grid, and with AFS an Euler
    NFE of 0 would need the 2-point grid AFS cannot use."""
    for solver, target, afs in [("euler", 0, False), ("euler", 0, True), ("heun", 1, True), ("heun", 0, False)]:
        with pytest.raises(ValueError, match="no grid"):
            num_steps_for_nfe(solver, target, afs)
    assert num_steps_for_nfe("euler", 1, afs=True) == 3
    assert num_steps_for_nfe("euler", 1, afs=False) == 2
    assert num_steps_for_nfe("heun", 3, afs=True) == 3


def test_teacher_gap_reference_grid_keeps_the_sampler_schedule_without_afs():
    """The teacher-gap reference (sfd.metrics.gap) refines the sampler's own schedule, endpoints and rho to
    the asked NFE of the reference solver, always without AFS."""
    from sfd.metrics.gap import reference_grid
    from sfd.sampling import GridSpec

    g = GridSpec(num_steps=4, afs=True, schedule="polynomial", t_min=0.01, t_max=50.0, rho=5.0)
    assert reference_grid(g, "dpmpp3m", 10) == GridSpec(num_steps=11, afs=False, schedule="polynomial",
                                                        t_min=0.01, t_max=50.0, rho=5.0)
    assert reference_grid(g, "heun", 10).num_steps == 6
