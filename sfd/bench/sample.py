"""`sample`: evaluation speed as `sfd.metrics.evaluate` runs it: a student's Euler + AFS sampling, and (given a
weights file) Inception features, in images per second; with `--compile`, the one-off compile time apart."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

import torch

from sfd.bench.common import (add_common_options, add_speed_options, bench_device, build_arch, describe_speed,
                              device_name, fresh_compiler_state, graph_counts, memory_label, peak_memory_gb)
from sfd.compiling import maybe_compile, runs_compiled
from sfd.distill import prepare_network, sync_device
from sfd.metrics.evaluate import sample_batch, student_sampler
from sfd.metrics.fd import FeatureStats
from sfd.metrics.inception import InceptionFeatures, to_uint8
from sfd.sampling import GridSpec

HELP = "evaluation speed: student sampling and Inception features, images/s"


def bench_sample(arch: str, batch: int, nfe: int, num: int, *, precision: str = "fp32", channels_last: bool = False,
                 group_norm: str = "native", compile: bool = False, compile_mode: str | None = None,
                 compile_backend: str = "inductor", inception: str | None = None, device: str | None = None,
                 warm_cache: bool = False) -> dict:
    """Time evaluation's two halves as `sfd.metrics.evaluate` runs them: a student of `arch` sampling `num` seeds
    with Euler + AFS at `nfe` in batches of `batch`, and (given a weights file) Inception features folded into
    running statistics. One warm-up batch first (with `compile`, the compile: its time is reported apart, since
    a run pays it once); each half is synchronised separately to split the time.

    A compile reuses what the compiler cached on disk in earlier processes, so its time depends on that
    history: it is timed against a fresh, empty cache (a first run on a machine) unless `warm_cache`."""
    if compile and not warm_cache:
        with _fresh_compiler_cache():
            return bench_sample(arch, batch, nfe, num, precision=precision, channels_last=channels_last,
                                group_norm=group_norm, compile=compile, compile_mode=compile_mode,
                                compile_backend=compile_backend, inception=inception, device=device,
                                warm_cache=True) | {"compile_cache": "cold"}
    device = bench_device(device)
    fresh_compiler_state(device)
    torch.manual_seed(0)
    net = build_arch(arch).to(device).eval().requires_grad_(False)
    prepare_network(net, channels_last=channels_last, group_norm=group_norm)
    fn = maybe_compile(net, compile, compile_mode, compile_backend)
    sampler = student_sampler(fn, GridSpec(num_steps=nfe + 2, afs=True), num_classes=getattr(net, "label_dim", 0))
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    features = InceptionFeatures(inception, device=device) if inception else None
    stats = FeatureStats()
    timed = {"sampling": 0.0, "features": 0.0}

    def one_batch(seeds, record: bool) -> float:
        t0 = time.perf_counter()
        samples, _ = sample_batch(sampler, list(seeds), shape, device, batch, precision, None)
        sync_device(device)
        t1 = time.perf_counter()
        if features is not None:
            stats.update(features(to_uint8(samples.clamp(-1, 1))))
            sync_device(device)
        if record:
            timed["sampling"] += t1 - t0
            timed["features"] += time.perf_counter() - t1
        return t1 - t0

    if device.type == "cuda":  # as `distill` does: the warm-up (compile, autotuning) counts
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = one_batch(range(min(batch, num)), record=False)
    for lo in range(0, num, batch):
        one_batch(range(lo, min(lo + batch, num)), record=True)
    sample_rate = num / timed["sampling"]
    feature_rate = num / timed["features"] if features is not None else None
    return {
        "arch": arch, "device": device_name(device),
        "batch": batch, "nfe": nfe, "num_samples": num, "precision": precision, "compile": compile,
        "compile_mode": compile_mode, "channels_last": channels_last, "group_norm": group_norm,
        "sampling_images_per_s": sample_rate, "features_images_per_s": feature_rate,
        "peak_memory_gb": peak_memory_gb(device),
        # the warm-up batch less a timed batch's share: the one-off compile (and first-call set-up) cost
        "setup_s": max(warmup_s - min(batch, num) / sample_rate, 0.0),
        **({"compile_fell_back": not runs_compiled(fn), "compile_cache": "warm", **graph_counts()}
           if compile else {}),
        # 50k samples (the FID protocol) at the measured rates: an extrapolation, labelled as one when printed.
        "extrapolated_50k_s": 50_000 / sample_rate + (50_000 / feature_rate if feature_rate else 0.0),
    }


@contextlib.contextmanager
def _fresh_compiler_cache():
    """Inductor's and Triton's on-disk caches in a new empty folder for the duration (then removed)."""
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="sfd-bench-compile-cache-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = tmp, os.path.join(tmp, "triton")
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def format_sample(r: dict) -> str:
    feats = (f"Inception features {r['features_images_per_s']:.0f} images/s" if r["features_images_per_s"]
             else "Inception features not timed (no --inception weights file)")
    cache = {"cold": "empty compiler cache", "warm": "compiler cache as found"}.get(r.get("compile_cache"), "")
    setup = (f"; first batch's extra (compile, {cache}) {r['setup_s']:.1f} s, paid once per process"
             if r["compile"] else "")
    return (f"{r['arch']} on {r['device']}: {r['num_samples']} samples at NFE {r['nfe']} (Euler + AFS), batch "
            f"{r['batch']}, {describe_speed(r)}\n"
            f"  sampling {r['sampling_images_per_s']:.0f} images/s; {feats}; {memory_label(r)} "
            f"{r['peak_memory_gb']:.2f} GiB{setup}\n"
            f"  50k samples at these rates (extrapolated, not timed): {r['extrapolated_50k_s']:.0f} s"
            f"{'' if r['features_images_per_s'] else ' of sampling'}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_options(p, [2])
    p.set_defaults(batch=1024)
    add_speed_options(p, "fp32")
    p.add_argument("--num", type=int, default=10_000, help="samples to time (after one warm-up batch)")
    p.add_argument("--inception", default=None, help="Inception-v3 2015-12-05 weights file: also time features")
    p.add_argument("--warm-cache", action="store_true",
                   help="with --compile: use the compiler's on-disk cache as found (default: time a cold compile)")


def run(args: argparse.Namespace) -> None:
    for nfe in args.nfe:
        r = bench_sample(args.arch, args.batch, nfe, args.num, precision=args.precision,
                         channels_last=args.channels_last, group_norm=args.group_norm, compile=args.compile,
                         compile_mode=args.compile_mode, inception=args.inception, device=args.device,
                         warm_cache=args.warm_cache)
        print(json.dumps(r) if args.json else format_sample(r), flush=True)
