"""Benchmark one SFD iteration: `python -m sfd.bench distill --arch cifar10 --batch 128 --nfe 2`.

Prints seconds per iteration (median of the timed iterations after warm-up), the teacher / student split,
trajectories per second and peak memory. Teachers are randomly initialised networks of the named
architecture: the cost of an iteration does not depend on the weights. `--arch tiny` runs on a CPU in
seconds.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys

import torch

from sfd.distill import DistillSettings, Distiller, make_student
from sfd.sampling import GridSpec

TINY = dict(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[], dropout=0.0)


def build_arch(arch: str) -> torch.nn.Module:
    from sfd.networks.edm import EDMPrecond, build_edm

    names = {"cifar10": "cifar10-32x32-uncond-vp", "imagenet64": "imagenet-64x64-cond-adm",
             "ffhq64": "ffhq-64x64-uncond-vp"}
    if arch == "tiny":
        return EDMPrecond(**TINY)
    if arch not in names:
        raise SystemExit(f"error: unknown --arch {arch!r}; choose from tiny, {', '.join(names)}")
    return build_edm(names[arch])


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux -> GiB (process RSS)


def bench_distill(arch: str, batch: int, nfe: int, *, solver: str = "dpmpp3m", m: int = 3,
                  precision: str = "fp32", compile: bool = False, compile_mode: str | None = None,
                  channels_last: bool = False, warmup: int = 2, iters: int = 5,
                  device: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    teacher = build_arch(arch).to(device).eval().requires_grad_(False)
    student = make_student(teacher)
    settings = DistillSettings(grid=GridSpec(num_steps=nfe + 2, afs=True), teacher_solver=solver, m=m,
                               batch_size=batch, total_kimg=1e6, precision=precision, compile=compile,
                               compile_mode=compile_mode, channels_last=channels_last,
                               num_classes=getattr(teacher, "label_dim", 0))
    d = Distiller(teacher, student, settings, device=device)
    d.shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    for i in range(warmup + iters):
        _, _, t_teacher, t_student = d.sfd_iteration(nfe + 2)
        if i >= warmup:
            records.append((t_teacher + t_student, t_teacher, t_student))
    total = statistics.median(r[0] for r in records)
    return {
        "arch": arch, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": batch, "nfe": nfe, "num_steps": nfe + 2, "teacher_solver": solver, "m": m,
        "precision": precision, "compile": compile, "channels_last": channels_last,
        "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "s_per_iter": total, "teacher_s": statistics.median(r[1] for r in records),
        "student_s": statistics.median(r[2] for r in records), "trajectories_per_s": batch / total,
        "peak_memory_gb": _peak_memory_gb(device), "timed_iters": iters,
    }


def _format(r: dict) -> str:
    return (f"{r['arch']} on {r['device']}: batch {r['batch']}, NFE {r['nfe']} (N={r['num_steps']}, AFS, "
            f"M={r['m']}, {r['teacher_solver']} teacher), {r['precision']}"
            f"{', compiled' if r['compile'] else ''}{', channels-last' if r['channels_last'] else ''}\n"
            f"  {r['s_per_iter']:.4f} s/iter (median of {r['timed_iters']}) = teacher {r['teacher_s']:.4f} s"
            f" + student {r['student_s']:.4f} s; {r['trajectories_per_s']:.1f} trajectories/s; "
            f"peak memory {r['peak_memory_gb']:.2f} GiB; {r['params_m']:.1f}M params")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sfd.bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="time SFD iterations")
    d.add_argument("--arch", default="tiny", help="tiny | cifar10 | imagenet64 | ffhq64")
    d.add_argument("--batch", type=int, default=128)
    d.add_argument("--nfe", type=int, nargs="+", default=[2])
    d.add_argument("--solver", default="dpmpp3m")
    d.add_argument("--m", type=int, default=3)
    d.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    d.add_argument("--compile", action="store_true")
    d.add_argument("--compile-mode", default=None)
    d.add_argument("--channels-last", action="store_true")
    d.add_argument("--warmup", type=int, default=2)
    d.add_argument("--iters", type=int, default=5)
    d.add_argument("--device", default=None)
    d.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    args = p.parse_args(argv)
    for nfe in args.nfe:
        r = bench_distill(args.arch, args.batch, nfe, solver=args.solver, m=args.m, precision=args.precision,
                          compile=args.compile, compile_mode=args.compile_mode, channels_last=args.channels_last,
                          warmup=args.warmup, iters=args.iters, device=args.device)
        print(json.dumps(r) if args.json else _format(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
