import pytest
import torch

from sfd.networks.mlp import MLPDenoiser
from sfd.sampling import GridSpec, generate, guided, seed_noise
from sfd.solvers import solve
from sfd.teachers import GaussianMixture


def test_samples_do_not_depend_on_batch_size():
    seeds = list(range(10, 24))
    # The noise of a seed is bit-identical whatever batch it is drawn in.
    assert torch.equal(seed_noise(seeds, (1, 4, 4))[3:5], seed_noise(seeds[3:5], (1, 4, 4)))
    # An exact float64 teacher gives bit-identical samples for batch sizes 1 and 7 ...
    gmm = GaussianMixture.random(3, (1, 4, 4), seed=0)
    grid = GridSpec(num_steps=4, afs=True)
    a, _ = generate(gmm, grid, seeds, (1, 4, 4), batch_size=1)
    b, _ = generate(gmm, grid, seeds, (1, 4, 4), batch_size=7)
    assert torch.equal(a, b)
    # ... and a float32 network agrees to rounding (BLAS picks other kernels for other batch shapes).
    torch.manual_seed(0)
    net = MLPDenoiser((1, 4, 4)).eval()
    a, _ = generate(net, grid, seeds, (1, 4, 4), batch_size=1)
    b, _ = generate(net, grid, seeds, (1, 4, 4), batch_size=7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_student_sampling_is_euler_with_afs_from_seed_noise():
    gmm = GaussianMixture.random(3, (2,), seed=0)
    grid = GridSpec(num_steps=5, afs=True, t_min=0.002)
    out, classes = generate(gmm, grid, [0, 1, 2], (2,))
    expected = solve("euler", gmm, seed_noise([0, 1, 2], (2,)) * 80.0, grid.timestamps(), afs=True)
    torch.testing.assert_close(out, expected)
    assert classes is None


def test_conditional_labels_and_guidance():
    calls = []

    def net(x, sigma, labels=None):
        calls.append(labels.clone())
        return labels[:, :1].expand_as(x) * 0.5

    x = torch.zeros(2, 3)
    labels = torch.eye(3)[:2]
    out = guided(net, labels, 3.0)(x, 1.0)
    # w·D(c) + (1-w)·D(null) with D(null) = 0 for this net.
    torch.testing.assert_close(out, 3.0 * labels[:, :1].expand_as(x) * 0.5)
    assert len(calls) == 2 and calls[1].abs().sum() == 0
    calls.clear()
    guided(net, labels, 1.0)(x, 1.0)
    assert len(calls) == 1  # scale 1: one evaluation
    samples, classes = generate(net, GridSpec(num_steps=3, afs=False), [0, 1, 2, 3], (3,), num_classes=3,
                                class_labels=[2, 0, 1, 0])
    assert classes.tolist() == [2, 0, 1, 0]
    # Random per-seed classes are reproducible.
    _, c1 = generate(net, GridSpec(num_steps=3, afs=False), range(20), (3,), num_classes=3, batch_size=3)
    _, c2 = generate(net, GridSpec(num_steps=3, afs=False), range(20), (3,), num_classes=3, batch_size=20)
    assert torch.equal(c1, c2) and len(set(c1.tolist())) == 3


def test_initial_noise_is_scaled_by_the_grids_t_max():
    """A non-default t_max (14.6146, the Stable-Diffusion-like sigma_max): the sample is the Euler solve from
    seed_noise · t_max, checked against a step-by-step Euler (no AFS) and the Euler+AFS solver."""
    gmm = GaussianMixture.random(3, (2,), seed=0)
    t_max, seeds = 14.6146, [0, 1, 2]
    grid = GridSpec(num_steps=5, afs=False, t_min=0.002, t_max=t_max)
    ts = [float(t) for t in grid.timestamps()]
    assert ts[0] == pytest.approx(t_max)
    x = seed_noise(seeds, (2,)) * t_max
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * (x - gmm(x, t)) / t
    out, _ = generate(gmm, grid, seeds, (2,))
    torch.testing.assert_close(out, x)
    afs_grid = GridSpec(num_steps=5, afs=True, t_min=0.002, t_max=t_max)
    out, _ = generate(gmm, afs_grid, seeds, (2,))
    expected = solve("euler", gmm, seed_noise(seeds, (2,)) * t_max, afs_grid.timestamps(), afs=True)
    torch.testing.assert_close(out, expected)


def test_guidance_mixes_conditional_and_null_outputs():
    """D = w·D(c) + (1-w)·D(null) where the null output is far from zero, so the sign of its weight matters."""

    def net(x, sigma, labels=None):
        return x * 0.5 + labels @ torch.tensor([[1.0, -2.0], [3.0, 0.5]]) + torch.tensor([1.5, -1.75]) + sigma

    x = torch.tensor([[0.2, -0.1], [1.0, 0.4]])
    labels = torch.eye(2)
    null = torch.zeros_like(labels)
    assert net(x, 0.7, null).abs().min() > 0.5
    for w in (3.0, 0.5, -1.0):
        out = guided(net, labels, w)(x, 0.7)
        torch.testing.assert_close(out, w * net(x, 0.7, labels) + (1 - w) * net(x, 0.7, null), rtol=0, atol=1e-6)
    # With w = 3: 3·D(c) - 2·D(null); worked out for the first row: D(c) = (3.3, -3.1), D(null) = (2.3, -1.1).
    torch.testing.assert_close(guided(net, labels, 3.0)(x, 0.7)[0], torch.tensor([5.3, -7.1]), rtol=0, atol=1e-5)
