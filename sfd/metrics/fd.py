"""Fréchet distance between Gaussians fitted to feature sets, and their statistics files.

Statistics are accumulated in float64 as running sums (sum of features, sum of outer products), so the
result does not depend on how the features were batched. Files use EDM's `fid-refs/*.npz` layout:
keys `mu` [D] and `sigma` [D, D].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sfd.distributed import Ranks

__all__ = ["FeatureStats", "frechet_distance", "save_stats", "load_stats", "check_reference_stats"]


class FeatureStats:
    """Running mean and covariance of feature vectors, exact in float64 for any batching.

    The sums live on the device of the first batch (float64), so GPU feature extraction never waits on a
    host copy per batch; `mu` and `sigma` bring them back once as numpy arrays.
    """

    def __init__(self) -> None:
        self.num: int = 0
        self._sum: torch.Tensor | None = None
        self._sum_outer: torch.Tensor | None = None

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(features)
        if x.ndim != 2:
            raise ValueError(f"FeatureStats.update expects features of shape [B, D], got {tuple(x.shape)}")
        if self._sum is not None and x.shape[1] != self._sum.shape[0]:
            raise ValueError(f"feature dim changed: had {self._sum.shape[0]}, got {x.shape[1]}")
        if self._sum is None:
            self._allocate(x.shape[1], x.device)
        x = x.to(device=self._sum.device, dtype=torch.float64)
        self._sum += x.sum(dim=0)
        self._sum_outer += x.T @ x
        self.num += x.shape[0]

    def _allocate(self, dim: int, device) -> None:
        self._sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def all_reduce(self, ranks: Ranks, dim: int, device) -> None:
        """Sum every rank's count, Σx and Σxxᵀ (float64) into each rank's, so `mu` and `sigma` are those of all
        ranks' features together, up to summation order. `dim` and `device` serve a rank that saw no features."""
        if not ranks.distributed:
            return
        if self._sum is None:
            self._allocate(dim, device)
        count = torch.tensor(float(self.num), dtype=torch.float64, device=self._sum.device)
        for total in (count, self._sum, self._sum_outer):
            ranks.sum_(total)
        self.num = int(count.item())

    def _require(self, least: int) -> None:
        if self.num < least:
            raise ValueError(f"FeatureStats needs at least {least} feature vectors, has {self.num}")

    @property
    def mu(self) -> np.ndarray:
        self._require(1)
        return (self._sum / self.num).cpu().numpy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (divides by N - 1), as EDM's reference statistics do."""
        self._require(2)
        mean = self._sum / self.num
        cov = (self._sum_outer - self.num * torch.outer(mean, mean)) / (self.num - 1)
        return cov.cpu().numpy()


def _check_stats(mu: np.ndarray, sigma: np.ndarray, what: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{what}: expected mu of shape [D] and sigma of shape [D, D], "
            f"got mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)}"
        )


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; rounding-level negative eigenvalues go to 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    tr((S1 S2)^{1/2}) = tr((A S2 A)^{1/2}) with A = S1^{1/2} (similar matrices), and since
    A S2 A = (A B)(A B)^T with B = S2^{1/2}, it is the sum of singular values of A B. Symmetric roots come
    from `eigh`, so everything is real by construction (no imaginary parts to drop, no eps·I retry for
    singular covariances, N < D). Taking singular values of A B instead of eigenvalues of A S2 A avoids
    squaring, which would lose half the digits on small eigenvalues: with the squared form the FD of a set
    with itself comes out ~1e-5 instead of ~1e-12. Cost at D = 2048 is similar to `scipy.linalg.sqrtm(S1 @ S2)`
    (seconds), negligible next to extracting the features.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_stats(mu1, sigma1, "first statistics")
    _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("statistics contain NaN or inf (were the features finite?)")
    tr_covmean = np.linalg.svd(_psd_sqrt(sigma1) @ _psd_sqrt(sigma2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write `mu`/`sigma` as an EDM-style `.npz` (float64)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_stats(mu, sigma, f"save_stats({path})")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics file must end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return path


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read `mu` [D] and `sigma` [D, D] from an `.npz` such as EDM's `fid-refs/cifar10-32x32.npz`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # corrupt zip, not an npz, pickled object...
        raise ValueError(f"{path}: not a readable .npz statistics file ({e})") from e
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(
                f"{path}: missing key(s) {missing}; expected keys 'mu' (shape [D]) and 'sigma' (shape [D, D]), "
                f"found {sorted(data.files)}"
            )
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    _check_stats(mu, sigma, str(path))
    return mu, sigma


def check_reference_stats(path: str | os.PathLike, dim: int) -> None:
    """Raise ValueError naming `path` unless it holds finite statistics of `dim`-dimensional features (the
    check a run makes before it trains, so a wrong file does not fail only after 50k samples)."""
    mu, sigma = load_stats(path)
    if mu.shape[0] != dim:
        raise ValueError(f"{path}: statistics of {mu.shape[0]}-dimensional features; FID needs Inception pool3 "
                         f"statistics ({dim}-dimensional), e.g. EDM's fid-refs/*.npz")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: the statistics contain NaN or inf")
