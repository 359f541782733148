"""Inception FID features from a local weights file (torch-fidelity's network), and reference statistics.

No real weights are needed: a randomly initialised state dict in torch-fidelity's format (a plain
`torch.save(state_dict)`, loaded with strict key matching) stands in for the 2015-12-05 file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sfd.assets import MissingAssetError
from sfd.metrics.fd import load_stats
from sfd.metrics.inception import (
    INCEPTION_ASSET,
    InceptionFeatures,
    build_reference_stats,
    compute_reference_stats,
    to_uint8,
)

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # the asset's file name


@pytest.fixture
def empty_homes(tmp_path, monkeypatch):
    """SFD_HOME and torch hub's folder point at empty temporary folders."""
    sfd_home, torch_home = tmp_path / "sfd-home", tmp_path / "torch-home"
    sfd_home.mkdir()
    monkeypatch.setenv("SFD_HOME", str(sfd_home))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(torch_home / "hub"))
    return sfd_home


@pytest.fixture(scope="module")
def extractor(random_weights):
    return InceptionFeatures(weights_path=random_weights)


def test_missing_weights_name_the_asset(empty_homes):
    with pytest.raises(MissingAssetError) as e:
        InceptionFeatures()
    assert INCEPTION_ASSET in str(e.value) and str(empty_homes) in str(e.value)
    with pytest.raises(MissingAssetError, match=INCEPTION_ASSET):
        InceptionFeatures(weights_path=empty_homes / "nowhere.pth")


def test_unreadable_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / WEIGHTS_NAME
    bad.write_text("not a state dict")
    with pytest.raises(ValueError, match="state dict") as e:
        InceptionFeatures(weights_path=bad)
    assert str(bad) in str(e.value)


def test_wrong_keys_are_a_clear_error(tmp_path):
    bad = tmp_path / WEIGHTS_NAME
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, bad)
    with pytest.raises(ValueError, match="Inception-v3") as e:
        InceptionFeatures(weights_path=bad)
    assert str(bad) in str(e.value)


def test_features_shape_and_grayscale(extractor):
    gray = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = extractor(gray)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.abs().sum() > 0
    torch.testing.assert_close(feats, extractor(gray.repeat(1, 3, 1, 1)))  # gray == same value in R, G, B


def test_features_reject_float_or_badly_shaped_input(extractor):
    with pytest.raises(TypeError, match="to_uint8"):
        extractor(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 1 or 3, H, W\]"):
        extractor(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


def test_to_uint8_matches_protocol():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
    expected = np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8)
    got = to_uint8(x)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), expected)
    assert got.tolist() == [0, 0, 64, 128, 255, 255, 255]


def _fake_extractor(x: torch.Tensor) -> torch.Tensor:
    """Cheap stand-in: per-channel means and a few pixels, enough to tell images and layouts apart."""
    x = x.double()
    return torch.cat([x.mean(dim=(2, 3)), x[:, :, :2, :2].flatten(1)], dim=1)


def test_reference_stats_layouts_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (7, 6, 5, 3), dtype=np.uint8)
    mu, sigma = compute_reference_stats(nhwc, _fake_extractor, batch_size=3)
    mu2, sigma2 = compute_reference_stats(nhwc.transpose(0, 3, 1, 2), _fake_extractor, batch_size=7)
    np.testing.assert_allclose(mu, mu2, atol=1e-12)
    np.testing.assert_allclose(sigma, sigma2, atol=1e-12)
    folder = tmp_path / "imgs" / "00000"
    folder.mkdir(parents=True)
    for i, img in enumerate(nhwc):
        Image.fromarray(img).save(folder / f"img{i:06d}.png")
    mu3, sigma3 = compute_reference_stats(tmp_path / "imgs", _fake_extractor, batch_size=4)
    np.testing.assert_allclose(mu, mu3, atol=1e-12)
    np.testing.assert_allclose(sigma, sigma3, atol=1e-12)
    with pytest.raises(TypeError, match="uint8"):
        compute_reference_stats(nhwc.astype(np.float32), _fake_extractor)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no PNG"):
        compute_reference_stats(tmp_path / "empty", _fake_extractor)


def test_build_reference_stats_finds_weights_in_sfd_home(empty_homes, random_weights, tmp_path):
    (empty_homes / WEIGHTS_NAME).symlink_to(random_weights)
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)  # grayscale NHWC
    out = tmp_path / "refs" / "tiny.npz"
    mu, sigma = build_reference_stats(images, out, batch_size=2)
    got_mu, got_sigma = load_stats(out)
    assert got_mu.shape == (2048,) and got_sigma.shape == (2048, 2048)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)


def test_build_reference_stats_checks_output_before_work(empty_homes, tmp_path):
    with pytest.raises(ValueError, match=r"\.npz"):
        build_reference_stats(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "out.txt")


def test_evaluation_benchmark_times_sampling_and_features(random_weights, capsys):
    """`sfd.bench sample` times a student's sampling and the Inception features of its samples (any weights
    file in the right format times the same arithmetic), and says when the features were not timed."""
    from sfd.bench import bench_sample, main

    r = bench_sample("tiny", batch=4, nfe=2, num=8, inception=str(random_weights), device="cpu")
    assert r["sampling_images_per_s"] > 0 and r["features_images_per_s"] > 0
    assert r["extrapolated_50k_s"] == pytest.approx(50_000 / r["sampling_images_per_s"]
                                                    + 50_000 / r["features_images_per_s"])
    assert main(["sample", "--arch", "tiny", "--batch", "4", "--num", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Inception features not timed" in out and "of sampling" in out


def test_fid_files_are_checked_before_the_run_trains(tmp_path, empty_homes, random_weights):
    """A reference file of the wrong dimension or with NaN, or weights that do not load, used to fail only
    after training and 50k samples (with a message naming no file): prepare() now refuses them by path."""
    import pickle
    import shutil
    from pathlib import Path

    from sfd.config import ConfigError, load_config
    from sfd.metrics.fd import save_stats
    from sfd.runner import prepare

    teacher = tmp_path / "teacher.pkl"
    teacher.write_bytes(pickle.dumps({"ema": None}))  # passes the teacher's header check; never loaded here
    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "cifar10_sfd.yaml",
                      [f"teacher.path={teacher}", "eval.metrics=[fid]"])
    weights, ref = empty_homes / WEIGHTS_NAME, empty_homes / "cifar10-32x32.npz"
    shutil.copyfile(random_weights, weights)
    rng = np.random.default_rng(0)
    save_stats(ref, rng.normal(size=64), np.eye(64))
    with pytest.raises(ConfigError, match=f"{ref}: statistics of 64-dimensional features"):
        prepare(cfg)
    save_stats(ref, np.full(2048, np.nan), np.eye(2048))
    with pytest.raises(ConfigError, match="contain NaN or inf"):
        prepare(cfg)
    save_stats(ref, rng.normal(size=2048), np.eye(2048))
    prepare(cfg)  # both files good
    weights.write_bytes(b"not a state dict")
    with pytest.raises(ConfigError, match=f"{weights}: cannot load as Inception-v3"):
        prepare(cfg)


def test_features_run_in_true_float32_whatever_the_runs_precision(extractor, monkeypatch):
    """A `tf32` run turns the process-wide TF32 switches on; Inception's features are computed with them off
    (the FID protocol's float32), and the switches are restored after."""
    from sfd.sampling import use_precision

    seen = []
    net = extractor.net
    monkeypatch.setattr(extractor, "net", lambda x: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)) or net(x))
    use_precision("tf32")
    try:
        extractor(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
        assert seen == [(False, False)]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        use_precision("fp32")


class _RunsCode:
    """A pickle payload that would create a file if unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_weights_file_is_read_once_and_only_safely(tmp_path, random_weights, monkeypatch):
    """torch-fidelity unpickles its weights with weights_only=False. The file used to be checked with
    weights_only=True, then loaded again by torch-fidelity from the same path (a file swapped in between would
    run its code). Now the pre-flight check and the network share one weights_only read of the file, and
    torch-fidelity gets those tensors in memory, never the path."""
    import shutil

    from sfd.metrics import inception

    weights = tmp_path / WEIGHTS_NAME
    shutil.copyfile(random_weights, weights)
    loads = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        loads.append((f if isinstance(f, str) else type(f).__name__, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    inception._read_weights.cache_clear()
    inception.check_inception_weights(weights)
    InceptionFeatures(weights_path=weights)
    assert loads[0] == (str(weights.resolve()), True)  # the file: once, tensors only
    assert [f for f, _ in loads[1:]] == ["BytesIO", "BytesIO"]  # each network: the tensors read above

    marker = tmp_path / "code-ran"
    torch.save({"fc.weight": _RunsCode(marker)}, weights)
    with pytest.raises(ValueError, match=f"{weights}: cannot load as Inception-v3"):
        InceptionFeatures(weights_path=weights)
    assert not marker.exists()
