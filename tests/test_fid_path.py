"""The FID branch of `evaluate` against statistics built by hand, and the teacher-gap reference of a
class-conditional, guided sampler.

No real Inception weights are needed: a randomly initialised state dict in torch-fidelity's format stands in
for the 2015-12-05 file (the `random_weights` fixture in tests/conftest.py).
"""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from sfd.assets import FID_REFS
from sfd.metrics.evaluate import evaluate, solver_sampler, student_sampler
from sfd.metrics.fd import FeatureStats, frechet_distance, save_stats
from sfd.metrics.gap import GAP_SOLVER, GAP_SOLVER_OPTS, per_sample_rmse, reference_grid
from sfd.metrics.inception import InceptionFeatures, to_uint8
from sfd.sampling import GridSpec, generate
from sfd.teachers import get_teacher


def test_fid_equals_frechet_distance_of_hand_built_statistics(random_weights, tmp_path):
    # A small image teacher (1x8x8 analytic mixture) under a dataset name that has FID reference statistics.
    teacher = dataclasses.replace(get_teacher("gmm-img-4"), dataset="cifar10")
    assert teacher.dataset in FID_REFS and teacher.shape == (1, 8, 8)
    n, batch = 8, 4
    features = InceptionFeatures(random_weights)
    # Reference statistics: uint8 noise images, written as EDM's fid-refs .npz.
    noise = torch.randint(0, 256, (n, *teacher.shape), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref_stats = FeatureStats()
    ref_stats.update(features(noise))
    ref_mu, ref_sigma = ref_stats.mu, ref_stats.sigma
    ref = save_stats(tmp_path / "ref.npz", ref_mu, ref_sigma)

    grid = GridSpec(num_steps=4, afs=True)
    sampler = student_sampler(teacher.net, grid)
    result = evaluate(sampler, teacher, ["fid"], num_samples=n, batch_size=batch, progress=False,
                      inception_weights=random_weights, fid_ref=ref)

    # By hand: the same seeds, clamped to [-1, 1], saved as uint8, Inception features, running statistics.
    samples, _ = generate(teacher.net, grid, range(n), teacher.shape)
    images = to_uint8(samples.clamp(-1, 1))
    stats = FeatureStats()
    for chunk in images.split(batch):
        stats.update(features(chunk))
    expected = frechet_distance(stats.mu, stats.sigma, ref_mu, ref_sigma)
    assert set(result.metrics) == {"fid"} and result.num_samples == n
    assert stats.sigma.diagonal().mean() > 1e-4  # features of a useful size, not ~0
    assert result.metrics["fid"] == pytest.approx(expected, rel=1e-6)


# ----- teacher gap of a class-conditional, guided sampler ------------------------------------------------

NUM_CLASSES = 3
CLASS_MEANS = torch.tensor([[0.8, -0.4, 0.2, 0.0], [-0.6, 0.5, -0.3, 0.4], [0.1, 0.9, -0.7, -0.5]])
DATA_VAR = 0.04


def conditional_denoiser(x, sigma, labels=None):
    """Exact denoiser of N(mean(labels), DATA_VAR·I): mean = labels @ CLASS_MEANS, so the null label (zeros)
    and no label at all both mean the unconditional N(0, DATA_VAR·I)."""
    mean = torch.zeros_like(x) if labels is None else labels.to(x.dtype) @ CLASS_MEANS.to(x.dtype)
    return mean + DATA_VAR / (DATA_VAR + sigma**2) * (x - mean)


@pytest.fixture
def cond_teacher():
    return types.SimpleNamespace(name="toy-cond", net=conditional_denoiser, shape=(4,), num_classes=NUM_CLASSES,
                                 dataset="gmm")


def test_teacher_gap_reference_keeps_classes_and_guidance(cond_teacher):
    gap_nfe, n, guidance = 8, 12, 2.0
    opts = GAP_SOLVER_OPTS.get(GAP_SOLVER)
    # The evaluated sampler is the reference solve itself: same solver, NFE, grid, classes and guidance.
    exact = solver_sampler(cond_teacher.net, GAP_SOLVER, gap_nfe, t_min=0.006, guidance=guidance,
                           num_classes=NUM_CLASSES, solver_opts=opts)
    assert exact.grid == reference_grid(exact.grid, GAP_SOLVER, gap_nfe)
    r = evaluate(exact, cond_teacher, ["teacher_gap"], n, batch_size=5, progress=False, gap_nfe=gap_nfe)
    assert r.metrics["teacher_gap_mean"] == pytest.approx(0.0, abs=1e-6)

    # Control: a few-step Euler student of the same guided teacher is clearly off its guided reference, by
    # exactly the RMSE to a hand-made guided reference solve; an unguided reference would give another value.
    grid = GridSpec(num_steps=4, afs=False, t_min=0.006)
    student = student_sampler(cond_teacher.net, grid, guidance=guidance, num_classes=NUM_CLASSES)
    r = evaluate(student, cond_teacher, ["teacher_gap"], n, batch_size=5, progress=False, gap_nfe=gap_nfe)
    samples, classes = generate(cond_teacher.net, grid, range(n), cond_teacher.shape, num_classes=NUM_CLASSES,
                                guidance=guidance)
    assert len(set(classes.tolist())) > 1
    ref_grid = reference_grid(grid, GAP_SOLVER, gap_nfe)
    guided_ref, _ = generate(cond_teacher.net, ref_grid, range(n), cond_teacher.shape, solver=GAP_SOLVER,
                             num_classes=NUM_CLASSES, guidance=guidance, solver_opts=opts)
    plain_ref, _ = generate(cond_teacher.net, ref_grid, range(n), cond_teacher.shape, solver=GAP_SOLVER,
                            solver_opts=opts)
    gap = float(per_sample_rmse(samples.clamp(-1, 1), guided_ref.clamp(-1, 1)).mean())
    unguided_gap = float(per_sample_rmse(samples.clamp(-1, 1), plain_ref.clamp(-1, 1)).mean())
    assert gap > 1e-2 and abs(unguided_gap - gap) > 0.1 * gap
    assert r.metrics["teacher_gap_mean"] == pytest.approx(gap, rel=1e-5)
