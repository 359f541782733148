import math

import torch

from sfd.teachers import GaussianMixture


def test_denoiser_equals_monte_carlo_posterior_mean():
    """E[x0 | x] by importance weighting exact samples agrees with the closed form."""
    gmm = GaussianMixture.random(3, (2,), spread=1.0, std=0.2, seed=1)
    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample(200_000, generator=g).double()
    sigma = 0.5
    x = torch.tensor([[0.3, -0.4], [1.0, 0.8]], dtype=torch.float64)
    for xi, d in zip(x, gmm(x, sigma)):
        logw = -((xi - x0) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x0).sum(0)
        torch.testing.assert_close(d, mc, atol=1e-2, rtol=0)


def test_limits_and_image_shapes():
    gmm = GaussianMixture.random(4, (1, 4, 4), seed=2)
    x = torch.randn(5, 1, 4, 4)
    # At tiny sigma the denoiser returns (almost) its input; at huge sigma the mixture mean.
    torch.testing.assert_close(gmm(x * 0.01, 1e-4), x * 0.01, atol=1e-4, rtol=0)
    far = gmm(x * 1e4, 1e4)
    torch.testing.assert_close(far, gmm.means.mean(0).float().expand_as(far), atol=2e-3, rtol=0)
    assert gmm.sample(3).shape == (3, 1, 4, 4)


def test_single_gaussian_flow_solves_the_ode():
    gmm = GaussianMixture.single(torch.tensor([0.2, -0.1]), 0.3)
    x = torch.randn(4, 2, dtype=torch.float64) * 10
    t, dt = 10.0, 1e-5
    # d/dt of the closed form equals (x - D(x, t)) / t.
    fwd = gmm.single_gaussian_flow(x, t, t + dt)
    bwd = gmm.single_gaussian_flow(x, t, t - dt)
    torch.testing.assert_close((fwd - bwd) / (2 * dt), (x - gmm(x, t)) / t, atol=1e-6, rtol=0)
    assert math.isclose(float(gmm.variances[0, 0]), 0.09)


def test_denoiser_on_unequal_mixture_equals_exact_posterior_mean():
    """Unequal variances and weights: the closed form agrees with E[x0 | x] integrated on a fine 2-D grid,
    where the posterior density is prior(x0)·N(x; x0, sigma²I) with the prior written out independently."""
    means = torch.tensor([[0.4, -0.2], [-0.5, 0.6]], dtype=torch.float64)
    variances, weights = torch.tensor([0.01, 1.0], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64)
    gmm = GaussianMixture(means, variances, weights)
    h = 0.01
    axis = torch.arange(-6.0, 6.0 + h / 2, h, dtype=torch.float64)
    x0 = torch.cartesian_prod(axis, axis)  # [M, 2]
    prior = sum(w * torch.exp(-((x0 - m) ** 2).sum(1) / (2 * v)) / (2 * math.pi * v)
                for m, v, w in zip(means, variances, weights))
    sigma = 0.4
    x = torch.tensor([[0.3, -0.4], [-0.2, 0.3], [1.2, 0.8], [-1.0, 1.5]], dtype=torch.float64)
    for xi, d in zip(x, gmm(x, sigma)):
        post = prior * torch.exp(-((xi - x0) ** 2).sum(1) / (2 * sigma**2))
        exact = (post[:, None] * x0).sum(0) / post.sum()
        torch.testing.assert_close(d, exact, atol=1e-6, rtol=0)
