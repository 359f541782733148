"""The embedded teachers: small EDM-preconditioned SongUNets trained on scikit-learn's 8x8 digits.

They exist so that the whole pipeline (distil, sample, evaluate, track, report) runs offline on a CPU in
minutes. Two variants ship in `weights/`:

- `digits`: unconditional.
- `digits-cond`: 10 classes, trained with label dropout, so the zero label is a real unconditional branch and
  classifier-free guidance works.

Each is `<name>.safetensors` (EMA weights) + `<name>.json` (network init kwargs, training config, measured
quality). Retrain with `python -m sfd.teachers.train digits --variant both`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from sfd.assets import shipped_weights
from sfd.metrics.digits import class_accuracy, digits_split, fd_digits, load_digits_data, pixel_fd
from sfd.networks.edm import EDMPrecond
from sfd.sampling import GridSpec, generate

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
VARIANTS: dict[str, bool] = {"digits": False, "digits-cond": True}  # name -> class-conditional
IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10

__all__ = [
    "WEIGHTS_DIR",
    "VARIANTS",
    "DigitsTeacherConfig",
    "network_kwargs",
    "edm_loss",
    "train_digits_teacher",
    "measure_quality",
    "save_teacher",
    "load_embedded_teacher",
    "embedded_teacher_info",
]


@dataclass
class DigitsTeacherConfig:
    """Everything that determines a trained digits teacher (with the seed, and up to CPU rounding)."""

    conditional: bool = False
    seed: int = 0
    kimg: float = 800.0  # training length in thousands of images drawn (~450 epochs of the 1,797 digits)
    batch_size: int = 128
    lr: float = 1e-3
    lr_warmup_kimg: float = 10.0  # linear warm-up, then cosine decay to 0
    ema_halflife_kimg: float = 50.0
    ema_rampup_ratio: float = 0.05  # EDM: half-life at most this fraction of the images seen so far
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    # Network (SongUNet / DDPM++ layout, shrunk to 8x8 and a 2-core CPU): 16 channels reach the quality
    # 32 channels do at 4x the forward cost, given 2.5x the images; the teacher is run far more than trained.
    model_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.1
    label_dropout: float = 0.1  # conditional only: makes the zero label the unconditional branch
    max_steps: int | None = None  # cap on optimiser steps (smoke tests)
    eval_every_kimg: float | None = None  # call the training hook this often (None: never)

    @property
    def name(self) -> str:
        return "digits-cond" if self.conditional else "digits"

    def total_steps(self) -> int:
        steps = max(1, round(self.kimg * 1000 / self.batch_size))
        return steps if self.max_steps is None else min(steps, self.max_steps)


def network_kwargs(cfg: DigitsTeacherConfig) -> dict:
    """EDMPrecond init kwargs (JSON-able) for a config."""
    kwargs = dict(img_resolution=IMAGE_SHAPE[1], img_channels=IMAGE_SHAPE[0],
                  label_dim=NUM_CLASSES if cfg.conditional else 0, sigma_data=cfg.sigma_data,
                  model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                  decoder_type="standard", model_channels=cfg.model_channels,
                  channel_mult=list(cfg.channel_mult), channel_mult_emb=cfg.channel_mult_emb,
                  num_blocks=cfg.num_blocks, attn_resolutions=list(cfg.attn_resolutions), dropout=cfg.dropout)
    if cfg.conditional:
        kwargs["label_dropout"] = cfg.label_dropout
    return kwargs


def edm_loss(net: torch.nn.Module, y: torch.Tensor, labels: torch.Tensor | None, cfg: DigitsTeacherConfig) -> torch.Tensor:
    """EDM's loss: ln σ ~ N(P_mean, P_std²), λ(σ) = (σ²+σd²)/(σ·σd)², mean of λ·(D(y+σn; σ) − y)²."""
    sigma = (torch.randn(y.shape[0], device=y.device) * cfg.p_std + cfg.p_mean).exp()
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s ** 2 + cfg.sigma_data ** 2) / (s * cfg.sigma_data) ** 2
    denoised = net(y + torch.randn_like(y) * s, sigma, labels)
    return (weight * (denoised - y) ** 2).mean()


def _lr_at(step: int, total: int, cfg: DigitsTeacherConfig) -> float:
    warmup = max(1, round(cfg.lr_warmup_kimg * 1000 / cfg.batch_size))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _ema_beta(nimg: int, cfg: DigitsTeacherConfig) -> float:
    halflife = min(cfg.ema_halflife_kimg * 1000, nimg * cfg.ema_rampup_ratio)
    return 0.5 ** (cfg.batch_size / max(halflife, 1e-8))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - beta)


def _batches(n: int, batch: int, gen: torch.Generator):
    """Endless shuffled epochs of indices; a short final chunk is topped up from the next epoch."""
    buf = torch.empty(0, dtype=torch.int64)
    while True:
        while buf.numel() < batch:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        yield buf[:batch]
        buf = buf[batch:]


Hook = Callable[[EDMPrecond, dict], None]


def train_digits_teacher(cfg: DigitsTeacherConfig, hook: Hook | None = None) -> tuple[EDMPrecond, dict]:
    """Train on all 1,797 digits with the EDM loss; return the EMA network (eval mode) and training info.

    `hook(ema, progress)` is called every `cfg.eval_every_kimg` (checkpoint quality checks); the RNG state
    of training does not depend on it.
    """
    images, labels = load_digits_data()
    onehot = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()
    total = cfg.total_steps()
    every = None if cfg.eval_every_kimg is None else max(1, round(cfg.eval_every_kimg * 1000 / cfg.batch_size))
    with torch.random.fork_rng(devices=[]):  # seeded training without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        net = EDMPrecond(**network_kwargs(cfg)).train()
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        order = _batches(len(images), cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
        losses, t0 = [], time.perf_counter()
        for step in range(total):
            idx = next(order)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg)
            loss = edm_loss(net, images[idx], onehot[idx] if cfg.conditional else None, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _ema_update(ema, net, _ema_beta((step + 1) * cfg.batch_size, cfg))
            losses.append(float(loss.detach()))
            if hook is not None and every is not None and (step + 1) % every == 0 and step + 1 < total:
                with torch.random.fork_rng(devices=[]):
                    hook(ema, {"step": step + 1, "kimg": (step + 1) * cfg.batch_size / 1000,
                               "seconds": time.perf_counter() - t0, "loss": sum(losses[-every:]) / every})
    tail = losses[-min(len(losses), 200):]
    info = {"steps": total, "kimg": total * cfg.batch_size / 1000, "train_seconds": round(time.perf_counter() - t0, 1),
            "final_loss_avg": sum(tail) / len(tail), "num_params": sum(p.numel() for p in ema.parameters()),
            "num_train_images": len(images)}
    ema.init_kwargs = network_kwargs(cfg)
    return ema, info


# ---------------------------------------------------------------------------------------------- quality


HEUN_GRID = dict(num_steps=18, afs=False, t_min=0.002, t_max=80.0)  # EDM's default sampler


def heun_samples(net: torch.nn.Module, num_samples: int, guidance: float | None = None,
                 first_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """18-step Heun samples clipped to [-1, 1] (seeds first_seed...); classes drawn per seed when
    `guidance` is given (conditional), else the network's own (for digits-cond: null-label) branch."""
    seeds = range(first_seed, first_seed + num_samples)
    kw = dict(num_classes=NUM_CLASSES, guidance=guidance) if guidance is not None else {}
    x, classes = generate(net, GridSpec(**HEUN_GRID), seeds, IMAGE_SHAPE, solver="heun", **kw)
    return x.clamp(-1, 1), classes


def reference_scales() -> dict:
    """fd_digits / pixel_fd of the held-out 20% split and of clipped Gaussian noise (vs all 1,797 digits)."""
    images, _ = load_digits_data()
    _, test_idx = digits_split()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    return {"heldout_split": {"n": len(test_idx), "fd_digits": fd_digits(images[test_idx]),
                              "pixel_fd": pixel_fd(images[test_idx])},
            "gaussian_noise": {"n": len(noise), "fd_digits": fd_digits(noise), "pixel_fd": pixel_fd(noise)}}


def _nn_distance(samples: torch.Tensor) -> float:
    """Median L2 distance from each sample to its nearest training digit (memorisation: ~0)."""
    data = load_digits_data()[0].flatten(1)
    return float(torch.cdist(samples.flatten(1), data).min(dim=1).values.median())


def measure_quality(net: torch.nn.Module, num_samples: int = 1000, guidances: tuple[float, ...] = (1.0, 2.0)) -> dict:
    """Quality of 18-step Heun samples: fd_digits, pixel_fd (vs all digits) and, if conditional, class
    accuracy per guidance scale; plus the reference scales to read them against."""
    t0 = time.perf_counter()
    cond = getattr(net, "label_dim", 0) > 0
    x, _ = heun_samples(net, num_samples)
    q: dict = {"num_samples": num_samples, "sampler": {"solver": "heun", **HEUN_GRID, "seeds": f"0..{num_samples - 1}"},
               "fd_digits": fd_digits(x), "pixel_fd": pixel_fd(x), "nn_distance_median": _nn_distance(x)}
    if cond:  # the plain call above used the null label: that is the unconditional branch
        q = {**q, "branch": "null label (unconditional)", "guided": {}}
        for w in guidances:
            xg, classes = heun_samples(net, num_samples, guidance=w)
            q["guided"][str(w)] = {"fd_digits": fd_digits(xg), "pixel_fd": pixel_fd(xg),
                                   "class_accuracy": class_accuracy(xg, classes)}
    data_nn = _data_nn_distance()
    q["reference"] = {**reference_scales(), "heldout_nn_distance_median": data_nn}
    q["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return q


def _data_nn_distance() -> float:
    """Median distance from held-out digits to their nearest training-split digit: what 'novel' looks like."""
    data = load_digits_data()[0].flatten(1)
    tr, te = digits_split()
    return float(torch.cdist(data[te], data[tr]).min(dim=1).values.median())


# ------------------------------------------------------------------------------------------- save / load


def save_teacher(net: EDMPrecond, cfg: DigitsTeacherConfig, info: dict, out: str | Path | None = None,
                 command: str = "") -> Path:
    """Write `<name>.safetensors` + `<name>.json` into `out` (default: the package weights folder)."""
    out = Path(out) if out is not None else WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    st = out / f"{cfg.name}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(st))
    meta = {"name": cfg.name, "network_kwargs": network_kwargs(cfg), "train_config": asdict(cfg), **info,
            "sha256": hashlib.sha256(st.read_bytes()).hexdigest(), "torch_version": torch.__version__,
            "command": command}
    js = out / f"{cfg.name}.json"
    js.write_text(json.dumps(meta, indent=2) + "\n")
    return js


def _weights(name: str, weights_dir: str | Path | None) -> Path:
    if name not in VARIANTS:
        raise ValueError(f"unknown embedded teacher {name!r}; choose one of {sorted(VARIANTS)}")
    return (Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR) / f"{name}.safetensors"


def embedded_teacher_info(name: str = "digits", weights_dir: str | Path | None = None) -> dict:
    """The json recorded next to a teacher's weights (kwargs, training config, quality), once the weights are
    checked against the SHA-256 it records (an AssetError naming the file otherwise)."""
    st = _weights(name, weights_dir)
    return shipped_weights(st, st.with_suffix(".json"), "restore it (git checkout, or reinstall sfd) or retrain "
                           "with `python -m sfd.teachers.train digits --variant both`")


def load_embedded_teacher(name: str = "digits", device: str | torch.device = "cpu",
                          weights_dir: str | Path | None = None) -> EDMPrecond:
    """A shipped digits teacher: EDMPrecond in eval mode, gradients off, `.init_kwargs` set. Offline; the
    file is plain tensors, so loading executes nothing."""
    kwargs = embedded_teacher_info(name, weights_dir)["network_kwargs"]
    net = EDMPrecond(**kwargs)
    net.load_state_dict(load_file(str(_weights(name, weights_dir))))
    net.init_kwargs = dict(kwargs)
    return net.to(device).eval().requires_grad_(False)
