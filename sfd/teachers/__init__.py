"""Where a teacher comes from: analytic Gaussian mixtures, EDM checkpoints, the embedded digits teachers."""
from sfd.teachers.gmm import GaussianMixture
from sfd.teachers.registry import TEACHERS, Teacher, check_teacher_assets, get_teacher


def load_edm_pickle(path, key: str = "ema"):
    """Safely load an NVlabs EDM network pickle (see `sfd.teachers.edm_pickle`)."""
    from sfd.teachers.edm_pickle import load_edm_pickle as _load

    return _load(path, key=key)


__all__ = ["GaussianMixture", "TEACHERS", "Teacher", "check_teacher_assets", "get_teacher", "load_edm_pickle"]
