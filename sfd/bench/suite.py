"""`suite`: `distill` for each named speed setting in turn (the baseline and each option added), so one run on a
card shows what every option buys there; a setting that fails is reported and the rest still run."""
from __future__ import annotations

import argparse
import json

import torch

from sfd.bench.common import add_common_options, add_timing_options
from sfd.bench.distill import bench_distill, format_distill

HELP = "time the baseline and each speed option in turn, on one card"

SUITE = {
    "fp32": dict(precision="fp32"),
    "tf32": dict(precision="tf32"),
    "bf16": dict(precision="bf16"),
    "bf16-cl": dict(precision="bf16", channels_last=True),
    "bf16-compile": dict(precision="bf16", compile=True),
    "bf16-cl-compile": dict(precision="bf16", channels_last=True, compile=True),
    "bf16-cl-cudagraphs": dict(precision="bf16", channels_last=True, compile=True, compile_mode="reduce-overhead"),
    # Candidates after the first H100 profile (group norm that keeps channels-last; Inductor's autotuning):
    "bf16-cl-gn": dict(precision="bf16", channels_last=True, group_norm="channel-stats"),
    "bf16-cl-compile-gn": dict(precision="bf16", channels_last=True, compile=True, group_norm="channel-stats"),
    "bf16-cl-cudagraphs-gn": dict(precision="bf16", channels_last=True, compile=True, compile_mode="reduce-overhead",
                                  group_norm="channel-stats"),
    "bf16-cl-autotune": dict(precision="bf16", channels_last=True, compile=True,
                             compile_mode="max-autotune-no-cudagraphs"),
}


def run_suite(arch: str, batch: int, nfes: list[int], configs: list[str], *, device: str | None = None,
              warmup: int = 2, iters: int = 5) -> list[dict]:
    """`bench_distill` for each named setting and NFE; a setting that fails is reported and the rest still run."""
    unknown = [c for c in configs if c not in SUITE]
    if unknown:
        raise SystemExit(f"error: unknown suite setting(s) {unknown}; choose from {', '.join(SUITE)}")
    results = []
    for name in configs:
        for nfe in nfes:
            try:
                r = bench_distill(arch, batch, nfe, warmup=warmup, iters=iters, device=device, **SUITE[name])
            except Exception as err:  # e.g. out of memory or a compiler error: record it, go on
                r = {"arch": arch, "batch": batch, "nfe": nfe, "error": f"{type(err).__name__}: {err}"}
            results.append({"setting": name, **r})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_options(p, [2, 4])
    add_timing_options(p)
    p.add_argument("--configs", nargs="+", default=list(SUITE), help=f"any of {', '.join(SUITE)}")


def run(args: argparse.Namespace) -> None:
    for r in run_suite(args.arch, args.batch, args.nfe, args.configs, device=args.device, warmup=args.warmup,
                       iters=args.iters):
        text = f"[{r['setting']}] NFE {r['nfe']}: {r['error']}" if "error" in r else f"[{r['setting']}] {format_distill(r)}"
        print(json.dumps(r) if args.json else text, flush=True)
