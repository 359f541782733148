import math

import numpy as np
import pytest
import torch

from sfd.sampling import GridSpec
from sfd.schedules import SD15_NOISE_LEVELS, DiscreteVP, get_schedule, refine_grid


@pytest.mark.parametrize("t_min,expected", [
    (0.006, [80.0, 10.9293, 0.6699, 0.006]),
    (0.002, [80.0, 9.72, 0.47, 0.002]),
])
def test_polynomial_matches_spec_worked_values(t_min, expected):
    grid = get_schedule("polynomial", 4, t_min, 80.0)
    # The spec prints the t_min = 0.002 row to two decimals only.
    tol = 1e-4 if t_min == 0.006 else 5e-3
    assert grid.tolist() == pytest.approx(expected, abs=tol)


def test_teacher_grid_of_spec_example():
    printed = "80 51.16 31.73 19.00 10.93 5.99 3.11 1.50 0.670 0.268 0.0936 0.0271 0.006".split()
    grid = refine_grid("polynomial", 4, 0.006, 80.0, 7.0, m=3)
    # Each value to half a unit of its last printed digit: a fixed absolute tolerance would leave the small
    # tail (0.0936, 0.0271) unchecked.
    for got, text in zip(grid.tolist(), printed, strict=True):
        decimals = len(text.partition(".")[2])
        assert got == pytest.approx(float(text), abs=0.5 * 10.0 ** -decimals + 1e-12), text


@pytest.mark.parametrize("kind", ["polynomial", "logsnr", "time_uniform"])
def test_endpoints_monotone_and_refinement(kind):
    grid = get_schedule(kind, 6, 0.006, 80.0)
    assert grid[0] == 80.0 and grid[-1] == 0.006
    assert bool((grid[1:] < grid[:-1]).all())
    fine = refine_grid(kind, 6, 0.006, 80.0, 7.0, m=3)
    assert len(fine) == 4 * 5 + 1
    torch.testing.assert_close(fine[::4], grid, rtol=1e-12, atol=0)


def test_logsnr_is_uniform_in_log_t():
    grid = get_schedule("logsnr", 5, 0.01, 100.0)
    steps = torch.diff(torch.log(grid))
    torch.testing.assert_close(steps, torch.full_like(steps, math.log(1e-4) / 4))


def test_time_uniform_hits_vp_endpoints_and_is_uniform_in_s_for_rho_1():
    grid = get_schedule("time_uniform", 5, 0.002, 80.0, rho=1.0)
    # Invert sigma(s) = sqrt(exp(beta_d s^2/2 + beta_min s) - 1): recover s and check it is evenly spaced.
    eps = 1e-3
    a, b = math.log1p(80.0**2), math.log1p(0.002**2)
    beta_d = 2 * (a - b / eps) / (1 - eps)
    beta_min = a - beta_d / 2
    y = torch.log1p(grid**2)
    s = (-beta_min + torch.sqrt(beta_min**2 + 2 * beta_d * y)) / beta_d
    torch.testing.assert_close(s, torch.linspace(1.0, eps, 5, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("args,match", [
    (("nope", 4, 0.002, 80.0), "unknown schedule"),
    (("polynomial", 1, 0.002, 80.0), "num_steps"),
    (("polynomial", 4, 80.0, 0.002), "t_min < t_max"),
    (("polynomial", 4, 0.0, 80.0), "t_min < t_max"),
])
def test_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        get_schedule(*args)


def _spec_grid(kind, n, t_min, t_max, rho):
    """Spec §2 in plain Python floats. time_uniform's beta_d, beta_min solve the 2x2 linear system
    0.5 beta_d + beta_min = ln(1 + t_max^2), 0.5 beta_d eps^2 + beta_min eps = ln(1 + t_min^2) by Cramer's rule."""
    eps = 1e-3
    out = []
    for i in range(n):
        f = i / (n - 1)
        if kind == "polynomial":
            out.append((t_max ** (1 / rho) + f * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho)
        elif kind == "logsnr":
            out.append(t_max * (t_min / t_max) ** f)
        else:
            l1, l2 = math.log(1 + t_max**2), math.log(1 + t_min**2)
            det = 0.5 * eps - 0.5 * eps**2
            beta_d, beta_min = (l1 * eps - l2) / det, (0.5 * l2 - 0.5 * eps**2 * l1) / det
            s = (1 + f * (eps ** (1 / rho) - 1)) ** rho
            out.append(math.sqrt(math.expm1(0.5 * beta_d * s * s + beta_min * s)))
    return out


@pytest.mark.parametrize("kind", ["polynomial", "logsnr", "time_uniform"])
@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_schedules_match_spec_formulas_in_float64(kind, rho):
    """Every point to 1e-10 relative (float64 throughout; float32 fractions are off by ~1e-8), for the
    default rho and another one: time_uniform's s-spacing depends on rho, logsnr's does not."""
    for n, t_min, t_max in [(7, 0.006, 80.0), (13, 0.002, 80.0), (5, 0.1, 14.6146)]:
        grid = get_schedule(kind, n, t_min, t_max, rho)
        assert grid.dtype == torch.float64
        assert grid.tolist() == pytest.approx(_spec_grid(kind, n, t_min, t_max, rho), rel=1e-10, abs=0)


def test_time_uniform_uses_rho():
    assert not torch.allclose(get_schedule("time_uniform", 6, 0.006, 80.0, 7.0),
                              get_schedule("time_uniform", 6, 0.006, 80.0, 1.0))


@pytest.mark.parametrize("kind", ["polynomial", "time_uniform"])
def test_refined_grid_keeps_rho(kind):
    """Spec §5: the teacher grid has the same family, endpoints and rho as the student grid, so the student
    grid is every (m+1)-th teacher point for any rho, not just the default 7."""
    student = get_schedule(kind, 4, 0.006, 80.0, rho=3.0)
    fine = refine_grid(kind, 4, 0.006, 80.0, 3.0, m=2)
    assert len(fine) == 10
    torch.testing.assert_close(fine[::3], student, rtol=1e-12, atol=0)
    assert not torch.allclose(student, get_schedule(kind, 4, 0.006, 80.0, rho=7.0))


# ----- discrete (the reference's schedule for LDM / Stable Diffusion teachers) ------------------------------------
# Stable Diffusion v1.5's noise levels written out independently of sfd.schedules: its scheduler config's
# scaled_linear betas (linear in sqrt(beta) from 0.00085 to 0.012, 1000 levels), alphas_cumprod = cumprod(1 - beta);
# level k sits at model time T_k = (k+1)/1000 with log alpha_k = 0.5 log(alphas_cumprod_k), and DPM-Solver's
# discrete VP interpolates log alpha linearly in T between the levels.
SD_BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
SD_LOG_ALPHA = 0.5 * np.log(np.cumprod(1.0 - SD_BETAS))
SD_TIMES = np.arange(1, 1001) / 1000


def _sd_sigma(t):
    return np.sqrt(np.exp(-2.0 * np.interp(t, SD_TIMES, SD_LOG_ALPHA)) - 1.0)


def _sd_model_time(sigma):
    return np.interp(-0.5 * np.log1p(np.square(sigma)), SD_LOG_ALPHA[::-1], SD_TIMES[::-1])


def test_sd15_noise_levels_match_the_betas_written_out():
    levels = SD15_NOISE_LEVELS
    assert levels == DiscreteVP.scaled_linear(0.00085, 0.012, 1000) and hash(levels) == hash(DiscreteVP.scaled_linear())
    np.testing.assert_allclose(levels.alphas_cumprod, np.cumprod(1.0 - SD_BETAS), rtol=1e-13)
    # sigma_min = sigma(T=1e-3) is level 0: sqrt(beta_0 / (1 - beta_0)); sigma_max = sigma(1), spec's 14.6146
    assert levels.sigma_min == pytest.approx(math.sqrt(0.00085 / (1 - 0.00085)), rel=1e-12)
    assert levels.sigma_max == pytest.approx(_sd_sigma(1.0), rel=1e-12) and round(levels.sigma_max, 4) == 14.6146
    t = np.array([1e-3, 0.0123, 0.5, 0.77777, 1.0])
    np.testing.assert_allclose(levels.sigma(torch.tensor(t)).numpy(), _sd_sigma(t), rtol=1e-12)
    s = np.array([0.0292, 0.1, 1.0, 3.3, 14.6])
    np.testing.assert_allclose(levels.model_time(torch.tensor(s)).numpy(), _sd_model_time(s), rtol=1e-12)


def test_discrete_timestep_is_the_level_index_at_each_level():
    """c = 1000·T(sigma) - 1 is exactly k at level k's sigma (the UNet's integer timesteps), fractional between."""
    levels = SD15_NOISE_LEVELS
    k = torch.tensor([0, 1, 250, 998, 999], dtype=torch.float64)
    sigma_k = torch.tensor(np.sqrt(np.exp(-2 * SD_LOG_ALPHA[k.long().numpy()]) - 1))
    torch.testing.assert_close(levels.timestep(sigma_k), k, rtol=0, atol=1e-9)
    mid = levels.timestep((sigma_k[2] * levels.sigma((k[2] + 2) / 1000)).sqrt())
    assert 250 < float(mid) < 251


@pytest.mark.parametrize("n,t_min,t_max", [(5, 0.1, 14.6146), (13, 0.1, 14.6146), (4, 0.5, 10.0)])
def test_discrete_rho_1_is_uniform_in_model_time(n, t_min, t_max):
    """rho = 1: T_i = T_max + i/(N-1)(T_min - T_max), t_i = sigma(T_i), against the levels written out."""
    grid = get_schedule("discrete", n, t_min, t_max, rho=1.0)
    t_hi, t_lo = _sd_model_time(t_max), _sd_model_time(t_min)
    expected = _sd_sigma(t_hi + np.arange(n) / (n - 1) * (t_lo - t_hi))
    np.testing.assert_allclose(grid.numpy(), expected, rtol=1e-10)
    assert grid[0] == t_max and grid[-1] == t_min
    steps = np.diff(_sd_model_time(grid.numpy()))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-8)


def test_discrete_rho_7_from_sigma_max_is_uniform_in_t_to_the_one_over_rho():
    """With t_max = sigma_max (T_max = 1) the reference's formula is uniform in T^(1/rho); t_max rounded to
    14.6146 gives the same grid to 2e-5 (its own start, sigma(T(t_max)^7), is 1.7e-5 below t_max)."""
    rho, n = 7.0, 6
    exact = get_schedule("discrete", n, 0.1, SD15_NOISE_LEVELS.sigma_max, rho)
    t_lo = _sd_model_time(0.1)
    expected = _sd_sigma((1.0 + np.arange(n) / (n - 1) * (t_lo ** (1 / rho) - 1.0)) ** rho)
    np.testing.assert_allclose(exact.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(np.diff(_sd_model_time(exact.numpy()) ** (1 / rho)),
                               (t_lo ** (1 / rho) - 1.0) / (n - 1), rtol=1e-8)
    rounded = get_schedule("discrete", n, 0.1, 14.6146, rho)
    assert rounded[0] == 14.6146
    torch.testing.assert_close(rounded[1:], exact[1:], rtol=2e-5, atol=0)
    assert not torch.allclose(exact, get_schedule("discrete", n, 0.1, SD15_NOISE_LEVELS.sigma_max, 1.0))


def test_discrete_refuses_a_start_other_than_t_max():
    """T_max is not raised to 1/rho (as the reference writes it): for t_max below sigma_max and rho != 1 the
    formula would start at sigma(T_max^rho) < t_max, where no sample is drawn."""
    with pytest.raises(ValueError, match="rho=1"):
        get_schedule("discrete", 4, 0.1, 10.0, rho=7.0)
    # Below sigma_min, T(sigma) extends the first segment (the reference's interpolation does): for SD it stays
    # positive, for levels whose first beta is the largest it reaches 0, which is refused by name.
    assert 0 < float(SD15_NOISE_LEVELS.model_time(1e-4)) < 1e-3
    decreasing = DiscreteVP.from_betas(np.linspace(0.02, 0.001, 1000))
    with pytest.raises(ValueError, match="below the teacher's noise levels"):
        get_schedule("discrete", 4, 1e-4, 1.0, 1.0, decreasing)


def test_discrete_uses_the_teachers_noise_levels_and_refines_exactly():
    linear = DiscreteVP.from_betas(np.linspace(0.0015, 0.0195, 1000))  # LDM's linear betas
    assert get_schedule("discrete", 4, 0.1, 10.0, 1.0, linear).tolist() != get_schedule(
        "discrete", 4, 0.1, 10.0, 1.0).tolist()
    student = get_schedule("discrete", 4, 0.1, 14.6146, 7.0)
    fine = refine_grid("discrete", 4, 0.1, 14.6146, 7.0, m=3)
    assert len(fine) == 13
    torch.testing.assert_close(fine[::4], student, rtol=1e-12, atol=0)
    assert GridSpec(num_steps=4, schedule="discrete", t_min=0.1, t_max=10.0, rho=1.0,
                    noise_levels=linear).timestamps().tolist() == get_schedule("discrete", 4, 0.1, 10.0, 1.0,
                                                                               linear).tolist()
