"""Distillation losses d(x_student, x_teacher) (spec §7): a per-sample value averaged over the batch.

No per-timestep weighting. Each loss is built by `get_loss(name, **opts)` and called as loss(pred, target).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from sfd.assets import require

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES = ("l1", "l2", "pseudo_huber", "lpips")
PAPER_NAMES = {"l1": "L1", "l2": "L2", "pseudo_huber": "Pseudo-Huber", "lpips": "LPIPS"}
# iCT's Pseudo-Huber constant per sqrt(dimension) (unconfirmed for SFD, so it is an option).
PSEUDO_HUBER_C_PER_SQRT_DIM = 0.00054
LPIPS_NETS = {"vgg": "lpips-vgg16", "alex": "lpips-alexnet"}  # LPIPS backbone -> its weights asset


def _per_sample(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1).sum(dim=1)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _per_sample((pred - target).abs()).mean()


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _per_sample((pred - target) ** 2).mean()


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float | None = None) -> torch.Tensor:
    if c is None:
        c = PSEUDO_HUBER_C_PER_SQRT_DIM * math.sqrt(pred[0].numel())
    return (torch.sqrt(_per_sample((pred - target) ** 2) + c * c) - c).mean()


class LPIPSLoss(torch.nn.Module):
    """LPIPS on images in [-1, 1], both bilinearly upsampled to 224×224; grayscale repeated to RGB.

    The lpips package ships its linear heads; the backbone comes from torchvision's cache, which must
    already hold the weights (we never let torchvision download them).
    """

    def __init__(self, net: str = "vgg", resize: int = 224):
        super().__init__()
        # Imported here on purpose: sfd.distill imports this module, and the speed tools (sfd.bench) run it on GPU
        # machines that hold PyTorch but not lpips; only a run with an LPIPS loss needs the package.
        import lpips

        asset = LPIPS_NETS.get(net)
        if asset is None:
            raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
        require(asset)  # clear error naming the file and the torch hub cache folder when absent
        self.model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
        self.resize = resize

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return x

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(self._prep(pred.float()), self._prep(target.float())).mean()


# What builds each loss. A loss's options are its keyword parameters (after pred, target for a function; the
# __init__ parameters for a module): get_loss passes them through, and config validation checks them against these.
LOSS_FNS = {"l1": l1_loss, "l2": l2_loss, "pseudo_huber": pseudo_huber_loss, "lpips": LPIPSLoss}


def get_loss(name: str, **opts) -> LossFn:
    if name not in LOSS_FNS:
        raise ValueError(f"unknown loss {name!r}; choose one of {list(LOSSES)}")
    fn = LOSS_FNS[name]
    if isinstance(fn, type):
        return fn(**opts)
    return functools.partial(fn, **opts) if opts else fn
