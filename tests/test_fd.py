"""Fréchet distance, float64 feature statistics and EDM-format statistics files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from sfd.metrics.fd import FeatureStats, frechet_distance, load_stats, save_stats


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _fd_scipy(mu1, s1, mu2, s2) -> float:
    """Independent reference: the textbook form with scipy's general (Schur) sqrtm on S1 S2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_fd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((500, 32)) * 3 + 1
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fd_of_itself_with_singular_covariance_is_zero():
    # N < D gives a rank-deficient covariance, the usual case for small sample sets.
    x = np.random.default_rng(1).standard_normal((20, 64)) * 10
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_fd_commuting_diagonal_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 5, 16), rng.uniform(0.1, 5, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fd_isotropic_by_hand():
    # N(0, I) vs N(1, 4I) in 3-D: |mu|^2 = 3, tr(I + 4I - 2*2I) = 3.
    assert frechet_distance(np.zeros(3), np.eye(3), np.ones(3), 4 * np.eye(3)) == pytest.approx(6.0, rel=1e-12)


def test_fd_non_commuting_matches_scipy():
    rng = np.random.default_rng(3)
    d = 24
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-9)
    assert got == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric in its arguments


def test_fd_rejects_mismatched_or_nonfinite_stats():
    with pytest.raises(ValueError, match="dims differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\[D, D\]"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    bad = np.eye(3)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(3), bad, np.zeros(3), np.eye(3))


def test_feature_stats_independent_of_batch_size():
    x = np.random.default_rng(4).standard_normal((257, 10)) * 5 + 3
    one, many = FeatureStats(), FeatureStats()
    for row in x:
        one.update(row[None])
    for i in range(0, len(x), 64):
        many.update(torch.from_numpy(x[i : i + 64]))
    assert one.num == many.num == 257
    np.testing.assert_allclose(one.mu, many.mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(one.sigma, many.sigma, rtol=0, atol=1e-10)
    np.testing.assert_allclose(many.mu, x.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(many.sigma, np.cov(x, rowvar=False), rtol=0, atol=1e-10)


def test_feature_stats_accumulates_float32_in_float64():
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    stats = FeatureStats()
    stats.update(x)
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.sigma, np.cov(x.double().numpy(), rowvar=False), atol=1e-12)


def test_feature_stats_errors():
    stats = FeatureStats()
    with pytest.raises(ValueError, match="at least"):
        _ = stats.mu
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        stats.update(np.zeros(5))
    stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="dim changed"):
        stats.update(np.zeros((2, 6)))


def test_load_edm_format_npz(tmp_path):
    # EDM's fid-refs/*.npz are plain np.savez(mu=..., sigma=...) files.
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(8), _random_cov(rng, 8)
    path = tmp_path / "cifar10-32x32.npz"
    np.savez(path, mu=mu, sigma=sigma)
    got_mu, got_sigma = load_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)


def test_save_load_round_trip(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    path = save_stats(tmp_path / "sub" / "ref.npz", mu, sigma)
    got = load_stats(path)
    np.testing.assert_array_equal(got[0], mu)
    np.testing.assert_array_equal(got[1], sigma)
    assert set(np.load(path).files) == {"mu", "sigma"}


def test_wrong_shaped_file_gives_clear_error(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, mu=np.zeros(4), sigma=np.zeros((4, 5)))
    with pytest.raises(ValueError) as e:
        load_stats(path)
    assert "bad.npz" in str(e.value) and "[D, D]" in str(e.value) and "(4, 5)" in str(e.value)
    np.savez(path, mu=np.zeros((4, 1)), sigma=np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"mu of shape \[D\]"):
        load_stats(path)


def test_missing_key_or_file_gives_clear_error(tmp_path):
    path = tmp_path / "nokey.npz"
    np.savez(path, mean=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError) as e:
        load_stats(path)
    assert "nokey.npz" in str(e.value) and "'mu'" in str(e.value)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_stats(tmp_path / "absent.npz")
