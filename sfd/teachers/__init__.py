"""Where a teacher comes from: analytic Gaussian mixtures, EDM checkpoints, the embedded digits teachers."""
from sfd.teachers.edm_pickle import load_edm_pickle
from sfd.teachers.gmm import GaussianMixture
from sfd.teachers.registry import (TEACHERS, Teacher, TeacherError, TeacherSpec, check_teacher_assets, get_teacher,
                                   teacher_spec)

__all__ = ["GaussianMixture", "TEACHERS", "Teacher", "TeacherError", "TeacherSpec", "check_teacher_assets",
           "get_teacher", "load_edm_pickle", "teacher_spec"]
