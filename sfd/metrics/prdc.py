"""Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models"), k-nearest-neighbour measures in a feature space, as the reference's `prdc.py` computes them.

With B(x, r) the ball around x whose radius r is the distance to x's k-th nearest neighbour within its own set
(the (k+1)-th smallest distance, the point itself being the first):
- precision: the share of fake samples inside some real ball;
- recall: the share of real samples inside some fake ball;
- density: (1/k) · the mean over fake samples of how many real balls contain them (can exceed 1);
- coverage: the share of real balls that contain at least one fake sample.
Comparisons are strict (d < r), as the reference's. The reference uses k = 5 on at most 10,000 samples per
set. Distances are computed in float64 in row chunks, so memory stays O(chunk · N) for any set size.

Feature extractors: Inception pool3 (`sfd.metrics.inception`) for images, the digits classifier's features
(`digits_prdc`) for the embedded digits teachers.
"""
from __future__ import annotations

import numpy as np
import torch

from sfd.metrics.digits import digits_features, load_digits_data

PRDC_NEAREST_K = 5
PRDC_MAX_SAMPLES = 10_000  # the reference's subsample per set
PRDC_METRICS = ("precision", "recall", "density", "coverage")

__all__ = ["PRDC_NEAREST_K", "PRDC_MAX_SAMPLES", "PRDC_METRICS", "prdc", "knn_radii", "digits_prdc"]


def _as_features(x, what: str) -> torch.Tensor:
    f = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64)
    if f.ndim != 2:
        raise ValueError(f"{what} features must have shape [N, D], got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{what} features contain NaN or inf")
    return f


def knn_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of the same set ([N], float64)."""
    return torch.cat([torch.cdist(rows, features).kthvalue(k + 1, dim=1).values for rows in features.split(chunk)])


def prdc(real, fake, nearest_k: int = PRDC_NEAREST_K, chunk: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` features against `real` features ([N, D] each)."""
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if not 1 <= nearest_k < min(len(real), len(fake)):
        raise ValueError(f"nearest_k must be between 1 and (smaller set size - 1) = {min(len(real), len(fake)) - 1}, "
                         f"got {nearest_k}")
    real_radii, fake_radii = knn_radii(real, nearest_k, chunk), knn_radii(fake, nearest_k, chunk)
    in_real_balls = torch.zeros(len(fake), dtype=torch.float64)  # per fake sample: how many real balls hold it
    real_recalled, real_covered = [], []
    for start in range(0, len(real), chunk):
        d = torch.cdist(real[start:start + chunk], fake)  # [chunk of real, fake]
        radii = real_radii[start:start + chunk, None]
        in_real_balls += (d < radii).sum(0)
        real_recalled.append((d < fake_radii[None, :]).any(1))
        real_covered.append(d.min(1).values < radii[:, 0])
    return {"precision": float((in_real_balls > 0).double().mean()),
            "recall": float(torch.cat(real_recalled).double().mean()),
            "density": float(in_real_balls.mean() / nearest_k),
            "coverage": float(torch.cat(real_covered).double().mean())}


def digits_prdc(images, nearest_k: int = PRDC_NEAREST_K, classifier=None) -> dict[str, float]:
    """PRDC of digit images ([N, 1, 8, 8] in [-1, 1]) against all 1,797 real digits, in the embedded digits
    classifier's feature space (the offline counterpart of Inception features)."""
    return prdc(digits_features(load_digits_data()[0], classifier), digits_features(images, classifier), nearest_k)
