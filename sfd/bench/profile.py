"""`profile`: where an SFD iteration's time goes, per phase (teacher trajectory, student steps), per kind of
kernel (GPU) or operator (CPU), and the top kernels by self time."""
from __future__ import annotations

import argparse

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from sfd.bench.common import (add_common_options, add_speed_options, add_timing_options, bench_device,
                              bench_distiller, speed_options)

HELP = "where an iteration's time goes: per phase, per kind of kernel, top kernels"

# Kernel (GPU) or operator (CPU) name fragments -> what the time is spent on, first match wins.
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("adam", "foreach")),
    ("gradient guard", ("nan_to_num",)),
    ("convolution", ("conv", "cudnn", "implicit", "xmma", "dgrad", "wgrad", "fprop")),
    ("matmul", ("gemm", "cutlass", "nvjet", "matmul", "addmm", "aten::mm", "aten::bmm")),
    ("fused (inductor)", ("triton",)),
    ("normalisation", ("norm",)),
    ("copy / layout", ("copy", "memcpy", "memset", "cat", "contiguous")),
]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in lowered for p in parts)), "other elementwise")


def profile_distill(arch: str, batch: int, nfe: int, *, solver: str = "dpmpp3m", m: int = 3, warmup: int = 2,
                    iters: int = 2, top: int = 20, device: str | None = None, **speed) -> str:
    """Profile `iters` SFD iterations after warm-up: time per phase, per kind of kernel, and the top kernels."""
    device = bench_device(device)
    _, d = bench_distiller(arch, batch, nfe, solver, m, device, **speed)
    for _ in range(warmup):
        d.sfd_iteration(nfe + 2)
    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in range(iters):
            d.sfd_iteration(nfe + 2)
    events = prof.key_averages()
    self_time = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    measured = [e for e in events if (e.device_type == DeviceType.CUDA) == on_gpu and self_time(e) > 0
                and not e.key.startswith(("sfd/", "ProfilerStep"))]
    total = sum(self_time(e) for e in measured)
    kinds: dict[str, float] = {}
    for e in measured:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + self_time(e)
    unit = "GPU kernel" if on_gpu else "CPU operator"
    lines = [f"{arch}, batch {batch}, NFE {nfe}, {speed}: {iters} profiled iterations, "
             f"{total / iters / 1e3:.1f} ms of {unit} time per iteration"]
    # The teacher range holds all its kernels. Backward kernels are launched from autograd's own thread, outside
    # the student-step range, so the student's share is the rest of the iteration's kernel time.
    teacher = next((e for e in events if e.key == "sfd/teacher_trajectory"), None)
    if teacher is not None:
        spent = teacher.device_time_total if on_gpu else teacher.cpu_time_total
        lines.append(f"  teacher trajectory: {spent / iters / 1e3:.1f} ms per iteration; student steps (forward, "
                     f"backward, optimizer) and the rest: {(total - spent) / iters / 1e3:.1f} ms")
    lines.append(f"  by kind ({unit} self time):")
    for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {kind:18s} {t / iters / 1e3:8.1f} ms  {100 * t / total:5.1f}%")
    lines.append(f"  top {top} by self time:")
    for e in sorted(measured, key=lambda e: -self_time(e))[:top]:
        lines.append(f"    {self_time(e) / iters / 1e3:8.2f} ms  {e.count // iters:5d}x  {e.key[:110]}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_options(p, [2])
    add_speed_options(p, "fp32")
    add_timing_options(p)
    p.add_argument("--top", type=int, default=20)


def run(args: argparse.Namespace) -> None:
    for nfe in args.nfe:
        print(profile_distill(args.arch, args.batch, nfe, warmup=args.warmup, iters=args.iters, top=args.top,
                              **speed_options(args)), flush=True)
