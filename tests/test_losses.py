import math

import pytest
import torch

from sfd.assets import MissingAssetError
from sfd.losses import get_loss


def test_reductions_are_per_sample_sums_averaged_over_batch():
    pred = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    target = torch.zeros(2, 2)
    assert get_loss("l1")(pred, target).item() == pytest.approx((2 + 2) / 2)
    assert get_loss("l2")(pred, target).item() == pytest.approx((2 + 4) / 2)
    c = 0.00054 * math.sqrt(2)
    expected = ((math.sqrt(2 + c * c) - c) + (math.sqrt(4 + c * c) - c)) / 2
    assert get_loss("pseudo_huber")(pred, target).item() == pytest.approx(expected)
    assert get_loss("pseudo_huber", c=1.0)(pred, target).item() == pytest.approx(
        ((math.sqrt(3) - 1) + (math.sqrt(5) - 1)) / 2)


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("huber")


def test_lpips_without_backbone_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SFD_HOME", str(tmp_path / "sfd"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingAssetError) as err:
        get_loss("lpips", net="vgg")
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and "checkpoints" in msg


def test_reductions_sum_over_every_element_of_image_shaped_samples():
    """Spec §7 on C×H×W samples: per-sample sums over all 48 elements, averaged over the batch; the
    Pseudo-Huber c = 0.00054·√d uses d = C·H·W, the whole sample."""
    pred = torch.stack([torch.ones(3, 4, 4), torch.full((3, 4, 4), -0.5)])
    target = torch.zeros_like(pred)
    assert get_loss("l1")(pred, target).item() == pytest.approx((48 * 1.0 + 48 * 0.5) / 2)
    assert get_loss("l2")(pred, target).item() == pytest.approx((48 * 1.0 + 48 * 0.25) / 2)
    c = 0.00054 * math.sqrt(48)
    expected = ((math.sqrt(48 + c * c) - c) + (math.sqrt(12 + c * c) - c)) / 2
    assert get_loss("pseudo_huber")(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_huber_with_c_zero_is_the_per_sample_l2_norm():
    """An explicit c = 0 is honoured (not replaced by the default): sqrt(||delta||^2) per sample."""
    pred = torch.stack([torch.ones(3, 4, 4), torch.full((3, 4, 4), -0.5)])
    loss = get_loss("pseudo_huber", c=0.0)(pred, torch.zeros_like(pred))
    assert loss.item() == pytest.approx((math.sqrt(48) + math.sqrt(12)) / 2, rel=1e-6)
