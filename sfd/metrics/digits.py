"""Embedded metric for the offline teacher trained on scikit-learn's 8x8 digits.

Inception features mean nothing on 8x8 grayscale digits, so the embedded setting gets its own feature
extractor: a small CNN classifier trained on a stratified 80% split of `load_digits()`, shipped as
`weights/digits_classifier.safetensors` (+ `.json` with the training config and measured accuracy).

- `fd_digits`: Fréchet distance between penultimate features of the images and of all 1,797 real digits.
- `pixel_fd`: the same in raw pixel space (64-d), needing no classifier.
- `class_accuracy`: fraction of images the classifier assigns to the intended label (class-conditional).

Images are float [N, 1, 8, 8] in [-1, 1] (data scaled as x/8 - 1); inputs are clipped to [-1, 1] first.
Retrain with `python -m sfd.metrics.digits train`; print the sanity figures with `... digits eval`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits  # bundled with sklearn: no download
from sklearn.model_selection import train_test_split
from torch import nn

from sfd.assets import shipped_weights
from sfd.metrics.fd import FeatureStats, frechet_distance
from sfd.threads import cpu_threads

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_NAME = "digits_classifier"

__all__ = [
    "load_digits_data",
    "digits_split",
    "DigitsClassifier",
    "load_digits_classifier",
    "check_digits_classifier",
    "digits_features",
    "fd_digits",
    "pixel_fd",
    "class_accuracy",
    "TrainConfig",
    "train_classifier",
]


# ----------------------------------------------------------------------------------------------- data


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 sklearn digits: images float32 [N, 1, 8, 8] in [-1, 1] (x/8 - 1), labels int64 [N]."""
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    return images, labels


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train_idx, test_idx) into `load_digits_data()`; fixed by `seed`."""
    _, labels = load_digits_data()
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=test_fraction, stratify=labels.numpy(), random_state=seed
    )
    return np.sort(train_idx), np.sort(test_idx)


def _as_digit_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Validate and clip to float32 [N, 1, 8, 8] in [-1, 1]; [N, 8, 8] gains the channel axis."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"digit images must have shape [N, 1, 8, 8] (or [N, 8, 8]), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no images given")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("digit images contain NaN or inf (did sampling diverge?)")
    return x.clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------- model


class DigitsClassifier(nn.Module):
    """Three 3x3 convs (8x8 -> 4x4 -> 2x2), a ReLU feature layer (the FD features), a linear head."""

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 4, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_digits_classifier(
    device: str | torch.device = "cpu", weights_dir: str | Path | None = None
) -> DigitsClassifier:
    """The shipped classifier (or one from `weights_dir`), in eval mode with gradients off."""
    st = (Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR) / f"{WEIGHTS_NAME}.safetensors"
    arch = check_digits_classifier(weights_dir)["arch"]
    model = DigitsClassifier(tuple(arch["channels"]), arch["feature_dim"], arch["num_classes"])
    model.load_state_dict(load_file(str(st)))
    return model.to(device).eval().requires_grad_(False)


def check_digits_classifier(weights_dir: str | Path | None = None) -> dict:
    """The classifier's recorded JSON, once its weights are checked against the SHA-256 it records (an AssetError
    naming the file otherwise): fd_digits and class_accuracy runs check it before they train."""
    st = (Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR) / f"{WEIGHTS_NAME}.safetensors"
    return shipped_weights(st, st.with_suffix(".json"), "restore it (git checkout, or reinstall sfd) or retrain "
                           "with `python -m sfd.metrics.digits train`")


@functools.lru_cache(maxsize=1)
def _default_classifier() -> DigitsClassifier:
    return load_digits_classifier()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def digits_features(
    images: torch.Tensor | np.ndarray, classifier: DigitsClassifier | None = None, batch_size: int = 1024
) -> torch.Tensor:
    """Penultimate features float32 [N, feature_dim] (on CPU) of images in [-1, 1]."""
    model = classifier if classifier is not None else _default_classifier()
    x, dev = _as_digit_images(images), _device_of(model)
    return torch.cat([model.features(b.to(dev)).float().cpu() for b in x.split(batch_size)])


def _feature_stats(images, classifier, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    stats = FeatureStats()
    stats.update(digits_features(images, classifier, batch_size))
    return stats.mu, stats.sigma


@functools.lru_cache(maxsize=1)
def _default_reference_stats() -> tuple[np.ndarray, np.ndarray]:
    return _feature_stats(load_digits_data()[0], _default_classifier(), 1024)


@functools.lru_cache(maxsize=1)
def _pixel_reference_stats() -> tuple[np.ndarray, np.ndarray]:
    return _pixel_stats(load_digits_data()[0])


def _pixel_stats(images) -> tuple[np.ndarray, np.ndarray]:
    stats = FeatureStats()
    stats.update(_as_digit_images(images).flatten(1))
    return stats.mu, stats.sigma


def fd_digits(
    images: torch.Tensor | np.ndarray, classifier: DigitsClassifier | None = None, batch_size: int = 1024
) -> float:
    """FD between classifier features of `images` and of all 1,797 real digits (reference cached)."""
    if classifier is None:
        ref = _default_reference_stats()
    else:  # a caller-supplied classifier (e.g. one being trained): its reference is cheap to recompute
        ref = _feature_stats(load_digits_data()[0], classifier, batch_size)
    return frechet_distance(*_feature_stats(images, classifier, batch_size), *ref)


def pixel_fd(images: torch.Tensor | np.ndarray) -> float:
    """FD in raw pixel space (64-d) between `images` and all 1,797 real digits."""
    return frechet_distance(*_pixel_stats(images), *_pixel_reference_stats())


@torch.no_grad()
def class_accuracy(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | int,
                   classifier: DigitsClassifier | None = None, batch_size: int = 1024) -> float:
    """Fraction of `images` the classifier assigns to the intended `labels` (an int means all the same)."""
    model = classifier if classifier is not None else _default_classifier()
    x, dev = _as_digit_images(images), _device_of(model)
    y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if y.numel() == 1:
        y = y.expand(x.shape[0])
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
    pred = torch.cat([model(b.to(dev)).argmax(dim=1).cpu() for b in x.split(batch_size)])
    return float((pred == y).double().mean())


# ------------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    seed: int = 0
    split_seed: int = 0
    test_fraction: float = 0.2
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1  # random translation in pixels, background (-1) filled in
    max_steps: int | None = None  # cap on optimiser steps (smoke tests)
    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 128
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError(f"epochs, batch_size and max_steps must be >= 1, got {self}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels per axis, filling with background (-1)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    oy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [n, h, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [n, 1, w]
    return pad[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def _lr_at(step: int, total: int, base: float) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))  # cosine decay to 0


def train_classifier(cfg: TrainConfig) -> tuple[DigitsClassifier, dict]:
    """Train on the stratified train split; return the model (eval mode) and its measured metrics. On one thread:
    tiny convs gain nothing from threads, and the result does not depend on the core count (or on other processes
    contending for the cores)."""
    with cpu_threads(1):
        return _train(cfg)


def _train(cfg: TrainConfig) -> tuple[DigitsClassifier, dict]:
    images, labels = load_digits_data()
    train_idx, test_idx = digits_split(cfg.test_fraction, cfg.split_seed)
    x_tr, y_tr = images[train_idx], labels[train_idx]
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = DigitsClassifier(cfg.channels, cfg.feature_dim, cfg.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    step, t0 = 0, time.perf_counter()
    model.train()
    while step < total:
        for b in torch.randperm(len(x_tr), generator=gen).split(cfg.batch_size):
            if step >= total:
                break
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg.lr)
            loss = F.cross_entropy(model(_random_shift(x_tr[b], cfg.max_shift, gen)), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval().requires_grad_(False)
    metrics = {
        "steps": step,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "final_loss": float(loss.detach()),
        "train_accuracy": class_accuracy(x_tr, y_tr, model),
        "test_accuracy": class_accuracy(images[test_idx], labels[test_idx], model),
        "num_train": len(train_idx),
        "num_test": len(test_idx),
    }
    return model, metrics


def _blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur ([1,2,1]/4 per axis), background-padded."""
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16.0).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), value=-1.0), k)


def sanity_figures(classifier: DigitsClassifier, split_seed: int = 0, test_fraction: float = 0.2) -> dict:
    """FD scale markers: data itself (~0), held-out split, blurred data, clipped Gaussian noise."""
    images, _ = load_digits_data()
    _, test_idx = digits_split(test_fraction, split_seed)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    sets = {
        "data_itself": images,
        "test_split": images[test_idx],
        "blurred_data": _blur(images),
        "gaussian_noise_clipped": noise,
    }
    ref = _feature_stats(images, classifier, 1024)  # once, not per set as fd_digits(.., classifier) would
    out = {"fd_digits": {k: frechet_distance(*_feature_stats(v, classifier, 1024), *ref) for k, v in sets.items()}}
    out["pixel_fd"] = {k: pixel_fd(v) for k, v in sets.items()}
    return out


def _write(model: DigitsClassifier, cfg: TrainConfig, metrics: dict, sanity: dict, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    st = out / f"{WEIGHTS_NAME}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    config = asdict(cfg)
    arch = {k: config.pop(k) for k in ("channels", "feature_dim", "num_classes")}
    info = {
        "arch": arch,
        "train_config": config,
        "metrics": metrics,
        "fd_sanity": sanity,
        "fd_sanity_sets": {
            "reference": "all 1,797 digits; fd_digits on the classifier's 128-d ReLU features, pixel_fd on 64 pixels",
            "data_itself": "all 1,797 digits (should be ~0)",
            "test_split": "the 360 held-out digits (small-sample bias included)",
            "blurred_data": "all digits, 3x3 binomial blur",
            "gaussian_noise_clipped": "1,797 N(0, I) images clipped to [-1, 1], seed 0",
        },
        "num_params": sum(p.numel() for p in model.parameters()),
        "sha256": hashlib.sha256(st.read_bytes()).hexdigest(),
        "torch_version": torch.__version__,
        "command": command,
    }
    js = out / f"{WEIGHTS_NAME}.json"
    js.write_text(json.dumps(info, indent=2) + "\n")
    return js


# ------------------------------------------------------------------------------------------------ CLI


def _parse(argv: list[str] | None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m sfd.metrics.digits", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the digits classifier and write its weights + json")
    t.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--split-seed", type=int, default=d.split_seed)
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--max-steps", type=int, default=None)
    e = sub.add_parser("eval", help="print accuracy and FD sanity figures of the weights in --weights-dir")
    e.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if args.cmd == "train":
        cfg = TrainConfig(seed=args.seed, split_seed=args.split_seed, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps)
        model, metrics = train_classifier(cfg)
        sanity = sanity_figures(model, cfg.split_seed, cfg.test_fraction)
        path = _write(model, cfg, metrics, sanity, args.out, "python -m sfd.metrics.digits " + " ".join(argv))
        result = {"json": str(path), "metrics": metrics, "fd_sanity": sanity}
    else:
        model = load_digits_classifier(weights_dir=args.weights_dir)
        cfg = json.loads((args.weights_dir / f"{WEIGHTS_NAME}.json").read_text())["train_config"]
        images, labels = load_digits_data()
        _, test_idx = digits_split(cfg["test_fraction"], cfg["split_seed"])
        result = {"test_accuracy": class_accuracy(images[test_idx], labels[test_idx], model),
                  "fd_sanity": sanity_figures(model, cfg["split_seed"], cfg["test_fraction"])}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
