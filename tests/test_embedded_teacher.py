"""The shipped digits teachers: fast offline loading, recorded config + quality, a live quality floor, and the
training command end to end (a few steps into a tmp dir)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from sfd.networks.edm import EDMPrecond
from sfd.teachers.embedded import (VARIANTS, WEIGHTS_DIR, DigitsTeacherConfig, embedded_teacher_info,
                                   heun_samples, load_embedded_teacher, network_kwargs, train_digits_teacher)

# Floors set from the shipped teachers with ~2.5-3x margin. Measured on seeds 0..199 (18-step Heun):
# digits fd_digits 10.6 / pixel_fd 0.57 (random 200-subsets of the real digits: 8-15 / ~0.6); digits-cond at
# guidance 2 fd_digits 25.5 (guidance trades diversity for accuracy), accuracy 1.0. Clipped Gaussian noise
# scores ~430 / ~45; an untrained network ~750 / ~41.
FD200_MAX = 30.0
FD200_GUIDED_MAX = 60.0
PIXEL_FD200_MAX = 1.5
ACCURACY_G2_MIN = 0.85  # class accuracy at guidance 2; chance is 0.1


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: more threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_loads_offline_fast_as_recorded(name):
    t0 = time.perf_counter()
    net = load_embedded_teacher(name)
    assert time.perf_counter() - t0 < 1.0
    info = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
    assert isinstance(net, EDMPrecond) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert net.init_kwargs == info["network_kwargs"]
    assert net.label_dim == (10 if VARIANTS[name] else 0)
    assert type(net.model).__name__ == info["network_kwargs"]["model_type"] == "SongUNet"
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = net(x * 2.0, torch.tensor([0.01, 0.5, 2.0, 80.0]))
    assert out.shape == (4, 1, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_conditional_teacher_uses_labels_and_null_label():
    net = load_embedded_teacher("digits-cond")
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    eye = torch.eye(10)
    by_label = net(x, 1.0, eye)  # the same noisy input under each of the 10 labels
    other = net(x, 1.0, eye.roll(1, dims=0))
    assert (by_label - other).abs().flatten(1).amax(1).min() > 0.05  # every label changes the output
    null = net(x, 1.0)
    assert torch.isfinite(null).all()
    torch.testing.assert_close(null, net(x, 1.0, torch.zeros(10, 10)))
    assert (null - by_label).abs().amax() > 0.05


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_json_records_config_and_quality(name):
    info = embedded_teacher_info(name)
    cfg = DigitsTeacherConfig(**{**info["train_config"], "channel_mult": tuple(info["train_config"]["channel_mult"]),
                                 "attn_resolutions": tuple(info["train_config"]["attn_resolutions"])})
    assert cfg.conditional == VARIANTS[name] and cfg.max_steps is None
    assert network_kwargs(cfg) == info["network_kwargs"]
    q = info["quality"]
    ref = q["reference"]
    assert q["num_samples"] >= 1000 and q["sampler"]["solver"] == "heun" and q["sampler"]["num_steps"] == 18
    # the recorded quality sits far from noise and within a few times the held-out split's
    assert q["fd_digits"] < 0.05 * ref["gaussian_noise"]["fd_digits"]
    assert q["pixel_fd"] < 0.05 * ref["gaussian_noise"]["pixel_fd"]
    if VARIANTS[name]:
        assert q["guided"]["2.0"]["class_accuracy"] >= ACCURACY_G2_MIN
        assert q["guided"]["1.0"]["class_accuracy"] >= 0.7
    assert info["forward_ms_batch128"] > 0 and info["train_seconds"] > 0


def test_live_quality_floor_unconditional():
    from sfd.metrics.digits import fd_digits, pixel_fd

    x, _ = heun_samples(load_embedded_teacher("digits"), 200)
    assert fd_digits(x) < FD200_MAX
    assert pixel_fd(x) < PIXEL_FD200_MAX


def test_live_quality_floor_conditional_guided():
    from sfd.metrics.digits import class_accuracy, fd_digits

    x, classes = heun_samples(load_embedded_teacher("digits-cond"), 200, guidance=2.0)
    assert class_accuracy(x, classes) >= ACCURACY_G2_MIN
    assert fd_digits(x) < FD200_GUIDED_MAX


def test_training_is_seeded():
    cfg = DigitsTeacherConfig(conditional=True, max_steps=2, batch_size=32)
    a, _ = train_digits_teacher(cfg)
    b, _ = train_digits_teacher(cfg)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_train_command_writes_loadable_files(tmp_path):
    from sfd.teachers.train import main

    results = main(["digits", "--variant", "both", "--max-steps", "3", "--batch-size", "16",
                    "--eval-samples", "0", "--out", str(tmp_path)])
    assert [r["steps"] for r in results] == [3, 3]
    for name in VARIANTS:
        assert (tmp_path / f"{name}.safetensors").is_file()
        net = load_embedded_teacher(name, weights_dir=tmp_path)
        info = embedded_teacher_info(name, weights_dir=tmp_path)
        assert info["train_config"]["max_steps"] == 3 and info["command"].startswith("python -m sfd.teachers.train")
        assert torch.isfinite(net(torch.randn(2, 1, 8, 8), 1.0)).all()


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sfd.teachers.train"):
        load_embedded_teacher("digits", weights_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown embedded teacher"):
        load_embedded_teacher("mnist")
