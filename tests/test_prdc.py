"""Precision, recall, density and coverage against a direct computation of Naeem et al.'s definitions."""
import numpy as np
import pytest
import torch

from sfd.metrics.inception import collect_features
from sfd.metrics.prdc import digits_prdc, knn_radii, prdc


def _direct(real, fake, k):
    """The definitions written out with loops over points (Naeem et al. 2020, eqs. 1-4; the radius is the
    distance to the k-th nearest other point of the same set; strict comparisons as the reference's prdc.py)."""
    def radius(points, i):
        return sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)[k - 1]

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    d = lambda i, j: np.linalg.norm(real[i] - fake[j])  # noqa: E731
    in_balls = [sum(d(i, j) < r_real[i] for i in range(len(real))) for j in range(len(fake))]
    return {"precision": np.mean([n > 0 for n in in_balls]),
            "recall": np.mean([any(d(i, j) < r_fake[j] for j in range(len(fake))) for i in range(len(real))]),
            "density": np.mean(in_balls) / k,
            "coverage": np.mean([min(d(i, j) for j in range(len(fake))) < r_real[i] for i in range(len(real))])}


@pytest.mark.parametrize("k,shift", [(3, 0.0), (5, 0.7), (1, 1.0)])
def test_prdc_equals_the_direct_computation(k, shift):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(40, 6))
    fake = rng.normal(size=(33, 6)) * 1.3 + shift
    got = prdc(real, fake, nearest_k=k, chunk=7)  # chunks that do not divide the sets
    want = _direct(real, fake, k)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert all(0 < got[m] < 1 for m in ("precision", "recall", "coverage"))  # not degenerate cases


def test_identical_sets_have_precision_recall_and_coverage_one():
    feats = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    got = prdc(feats, feats.clone(), nearest_k=5)
    assert got["precision"] == got["recall"] == got["coverage"] == 1.0
    assert got["density"] == pytest.approx(_direct(feats.numpy(), feats.numpy(), 5)["density"], rel=1e-12)


def test_far_apart_sets_score_zero_and_radii_skip_the_point_itself():
    a = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    got = prdc(a, a + 100.0, nearest_k=2)
    assert got == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    line = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert knn_radii(line, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert knn_radii(line, 2).tolist() == [3.0, 2.0, 3.0, 5.0]


def test_bad_features_are_refused():
    with pytest.raises(ValueError, match="nearest_k"):
        prdc(torch.randn(5, 2), torch.randn(5, 2), nearest_k=5)
    with pytest.raises(ValueError, match="dims differ"):
        prdc(torch.randn(9, 2), torch.randn(9, 3))
    with pytest.raises(ValueError, match="NaN"):
        prdc(torch.full((9, 2), float("nan")), torch.randn(9, 2))


def test_digits_prdc_uses_the_classifier_features():
    """Real digits against themselves: precision = recall = coverage = 1; noise images are far from them."""
    from sfd.metrics.digits import load_digits_data

    real = load_digits_data()[0][:300]
    assert digits_prdc(real)["precision"] == 1.0
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = digits_prdc(noise)
    assert scores["precision"] < 0.5 and scores["coverage"] < 0.5


def test_collect_features_keeps_every_image():
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    feats = collect_features(images, lambda b: b.flatten(1).float(), batch_size=3)
    torch.testing.assert_close(feats, images.flatten(1).float())
