import math

import pytest
import torch

from sfd.schedules import get_schedule, refine_grid


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
