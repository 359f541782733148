"""An exact analytic teacher: a Gaussian mixture whose denoiser E[x0 | x_t = x] is known in closed form.

Component k is N(mean_k, diag(var_k)) on tensors of any shape (2-D points or C×H×W "images"). Under the VE
noising x_t = x0 + t·eps the component becomes N(mean_k, diag(var_k + t²)), so the posterior mean is the
responsibility-weighted sum of per-component Wiener filters.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class GaussianMixture(torch.nn.Module):
    """Mixture of diagonal Gaussians. Call it as a denoiser: ``gmm(x, sigma) -> D(x; sigma)``."""

    def __init__(self, means: torch.Tensor, variances, weights: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        k = means.shape[0]
        variances = torch.as_tensor(variances, dtype=torch.float64)
        variances = variances.reshape(k, *([1] * (means.ndim - 1))) if variances.ndim <= 1 else variances
        variances = torch.broadcast_to(variances, means.shape).clone()
        if (variances <= 0).any():
            raise ValueError("GaussianMixture variances must be positive")
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-9):
            raise ValueError("GaussianMixture weights must be K non-negative numbers summing to 1")
        self.register_buffer("means", means)
        self.register_buffer("variances", variances)
        self.register_buffer("weights", w)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    @classmethod
    def single(cls, mean: torch.Tensor, std: float) -> "GaussianMixture":
        return cls(torch.as_tensor(mean, dtype=torch.float64)[None], [std**2])

    @classmethod
    def random(cls, num_components: int, shape: Sequence[int], *, spread: float = 0.6, std: float = 0.1,
               seed: int = 0) -> "GaussianMixture":
        """K components with means uniform in [-spread, spread] and isotropic std: a reproducible toy target."""
        g = torch.Generator().manual_seed(seed)
        means = (torch.rand(num_components, *shape, generator=g, dtype=torch.float64) * 2 - 1) * spread
        return cls(means, [std**2] * num_components)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples from the data distribution (float32, on the buffers' device)."""
        comp = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        eps = torch.randn(n, *self.shape, generator=generator, dtype=torch.float64)
        x = self.means.cpu()[comp] + self.variances.cpu()[comp].sqrt() * eps
        return x.to(device=self.means.device, dtype=torch.float32)

    def forward(self, x: torch.Tensor, sigma, labels=None, step=None) -> torch.Tensor:
        """Exact posterior mean E[x0 | x_sigma = x], computed in float64."""
        xd = x.to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * len(self.shape))) ** 2
        # Log-likelihood of x under each noised component: [B, K].
        total_var = self.variances[None] + s2[:, None]  # [B or 1, K, *shape]
        diff = xd[:, None] - self.means[None]
        log_like = -0.5 * (diff**2 / total_var + torch.log(2 * math.pi * total_var))
        log_like = log_like.reshape(*log_like.shape[:2], -1).sum(-1) + torch.log(self.weights)[None]
        resp = torch.softmax(log_like, dim=1)  # [B, K]
        wiener = self.means[None] + self.variances[None] / total_var * diff  # E[x0 | x, k]
        out = (resp.reshape(*resp.shape, *([1] * len(self.shape))) * wiener).sum(1)
        return out.to(x.dtype)

    def single_gaussian_flow(self, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
        """Closed-form PF-ODE solution for a one-component mixture: x - mu scales by sqrt((v + t_to²)/(v + t_from²))."""
        if self.means.shape[0] != 1:
            raise ValueError("the closed-form flow exists for a single Gaussian only")
        mu, v = self.means[0], self.variances[0]
        scale = torch.sqrt((v + t_to**2) / (v + t_from**2))
        return (mu + scale * (x.to(torch.float64) - mu)).to(x.dtype)
