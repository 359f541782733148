"""The embedded digits metric: shipped classifier, fd_digits / pixel_fd / class_accuracy, training command."""

from __future__ import annotations

import json

import pytest
import torch

from sfd.metrics import class_accuracy, fd_digits, load_digits_classifier, load_digits_data, pixel_fd
from sfd.metrics.digits import WEIGHTS_DIR, TrainConfig, digits_features, digits_split, main, train_classifier


@pytest.fixture(scope="module")
def data():
    return load_digits_data()


@pytest.fixture(scope="module")
def shipped_info():
    return json.loads((WEIGHTS_DIR / "digits_classifier.json").read_text())


def _noise(n: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


def test_load_digits_data(data):
    images, labels = data
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_shipped_weights_small_and_documented(shipped_info):
    assert (WEIGHTS_DIR / "digits_classifier.safetensors").stat().st_size < 1_000_000
    assert shipped_info["metrics"]["test_accuracy"] >= 0.95
    assert {"seed", "split_seed", "test_fraction", "epochs", "lr"} <= set(shipped_info["train_config"])


def test_shipped_classifier_held_out_accuracy(data, shipped_info):
    images, labels = data
    cfg = shipped_info["train_config"]
    _, test_idx = digits_split(cfg["test_fraction"], cfg["split_seed"])
    model = load_digits_classifier()
    assert not model.training
    acc = class_accuracy(images[test_idx], labels[test_idx], model)
    assert acc >= 0.95
    assert acc == pytest.approx(shipped_info["metrics"]["test_accuracy"], abs=1e-9)


def test_fd_digits_scale(data):
    images, _ = data
    _, test_idx = digits_split()
    noise = fd_digits(_noise(1797))
    held_out = fd_digits(images[test_idx])
    itself = fd_digits(images)
    assert abs(itself) < 1e-6 * noise
    assert noise > 50 * held_out > 0


def test_pixel_fd_scale(data):
    images, _ = data
    _, test_idx = digits_split()
    noise = pixel_fd(_noise(1797))
    assert abs(pixel_fd(images)) < 1e-6 * noise
    assert noise > 50 * pixel_fd(images[test_idx])


def test_inputs_are_clipped_and_validated(data):
    images, _ = data
    assert fd_digits(images[:200] * 3) == pytest.approx(fd_digits((images[:200] * 3).clamp(-1, 1)), abs=1e-9)
    assert digits_features(images[:5].numpy()[:, 0]).shape == (5, 128)  # ndarray [N, 8, 8] accepted
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        fd_digits(torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        pixel_fd(torch.full((4, 1, 8, 8), float("nan")))


def test_class_accuracy(data):
    images, labels = data
    assert class_accuracy(images, labels) > 0.95
    assert class_accuracy(images, (labels + 1) % 10) < 0.05
    zeros = images[labels == 0]
    assert class_accuracy(zeros, 0) > 0.95  # one int label for the whole batch
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(images[:4], labels[:3])


def test_training_command_smoke(tmp_path):
    out = tmp_path / "w"
    result = main(["train", "--out", str(out), "--max-steps", "5", "--seed", "3"])
    info = json.loads((out / "digits_classifier.json").read_text())
    assert info["metrics"]["steps"] == 5 and info["train_config"]["seed"] == 3
    assert 0.0 <= info["metrics"]["test_accuracy"] <= 1.0
    assert set(info["fd_sanity"]["fd_digits"]) >= {"test_split", "blurred_data", "gaussian_noise_clipped"}
    assert result["metrics"] == info["metrics"]
    model = load_digits_classifier(weights_dir=out)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_training_is_reproducible():
    cfg = TrainConfig(seed=7, max_steps=4)
    a, _ = train_classifier(cfg)
    b, _ = train_classifier(cfg)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_bad_training_config_fails_early():
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_missing_weights_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sfd.metrics.digits train"):
        load_digits_classifier(weights_dir=tmp_path)
