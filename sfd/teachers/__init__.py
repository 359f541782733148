"""Where a teacher comes from: analytic Gaussian mixtures, EDM checkpoints, the embedded digits teachers."""
from sfd.teachers.gmm import GaussianMixture

__all__ = ["GaussianMixture"]
