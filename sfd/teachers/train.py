"""Train the embedded digits teachers and write `<name>.safetensors` + `<name>.json`.

    python -m sfd.teachers.train digits --variant both            # the shipped weights
    python -m sfd.teachers.train digits --variant cond --kimg 5 --out /tmp/t --eval-samples 0

The json records the network kwargs, the full training config, training time and the measured quality
(18-step Heun samples: fd_digits, pixel_fd, class accuracy under guidance) with its reference scales.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from sfd.metrics.digits import fd_digits, pixel_fd
from sfd.teachers.embedded import (WEIGHTS_DIR, DigitsTeacherConfig, heun_samples, measure_quality, save_teacher,
                                   train_digits_teacher)

_VARIANTS = {"uncond": [False], "cond": [True], "both": [False, True]}


def _parse(argv: list[str]) -> argparse.Namespace:
    d = DigitsTeacherConfig()
    p = argparse.ArgumentParser(prog="python -m sfd.teachers.train", description=__doc__.split("\n")[0])
    p.add_argument("dataset", choices=["digits"], help="the embedded dataset (scikit-learn's 8x8 digits)")
    p.add_argument("--variant", choices=sorted(_VARIANTS), default="both")
    p.add_argument("--kimg", type=float, default=None, help="training length in thousands of images "
                   "(default: the config's, per variant)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps (smoke tests)")
    p.add_argument("--eval-samples", type=int, default=2000, help="Heun samples for the recorded quality "
                   "(0: skip measuring)")
    p.add_argument("--eval-every-kimg", type=float, default=None, help="print checkpoint quality this often")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy CPU)")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    return p.parse_args(argv)


def config_for(conditional: bool, args: argparse.Namespace) -> DigitsTeacherConfig:
    cfg = DigitsTeacherConfig(conditional=conditional)
    cfg = replace(cfg, seed=args.seed, batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps,
                  eval_every_kimg=args.eval_every_kimg)
    return cfg if args.kimg is None else replace(cfg, kimg=args.kimg)


def _checkpoint_hook(num_samples: int):
    def hook(ema: torch.nn.Module, progress: dict) -> None:
        x, _ = heun_samples(ema, num_samples)
        print(f"  kimg {progress['kimg']:.0f}  {progress['seconds']:.0f}s  loss {progress['loss']:.4f}  "
              f"fd_digits {fd_digits(x):.2f}  pixel_fd {pixel_fd(x):.3f}  ({num_samples} samples)", flush=True)

    return hook


def train_one(cfg: DigitsTeacherConfig, eval_samples: int, out: Path, command: str) -> dict:
    print(f"training {cfg.name}: {cfg.total_steps()} steps of batch {cfg.batch_size}, seed {cfg.seed}", flush=True)
    hook = _checkpoint_hook(min(eval_samples, 1000) or 200) if cfg.eval_every_kimg else None
    net, info = train_digits_teacher(cfg, hook)
    info["forward_ms_batch128"] = forward_ms(net)
    if eval_samples > 0:
        info["quality"] = measure_quality(net, eval_samples)
    path = save_teacher(net, cfg, info, out, command)
    print(json.dumps({"json": str(path), **{k: v for k, v in info.items() if k != "quality"}}, indent=2))
    if "quality" in info:
        print(json.dumps(info["quality"], indent=2), flush=True)
    return {"json": str(path), **info}


@torch.no_grad()
def forward_ms(net: torch.nn.Module, batch: int = 128, repeats: int = 20) -> float:
    """Best-of-`repeats` fp32 forward time at `batch` (ms): best-of, because the CPU is shared."""
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(batch, net.label_dim) if getattr(net, "label_dim", 0) else None
    net(x, 1.0, labels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        net(x, 1.0, labels)
        times.append(time.perf_counter() - t0)
    return round(min(times) * 1e3, 2)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    command = "python -m sfd.teachers.train " + " ".join(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return [train_one(config_for(c, args), args.eval_samples, args.out, command) for c in _VARIANTS[args.variant]]
    finally:  # a caller (a test) keeps its own setting
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
