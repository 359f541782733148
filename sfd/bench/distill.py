"""`distill`: seconds per SFD iteration (median of the timed iterations after warm-up), the teacher / student
split, trajectories per second, peak memory, and the model TFLOP/s those imply."""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from sfd.bench.common import (add_common_options, add_speed_options, add_timing_options, bench_device,
                              bench_distiller, describe_speed, device_name, graph_counts, memory_label,
                              peak_memory_gb, speed_options)
from sfd.compiling import runs_compiled
from sfd.solvers import nfe as solver_nfe

HELP = "time SFD iterations"


def _counted_tflop(net: torch.nn.Module, batch: int, backward: bool) -> float:
    """Matrix-multiply and convolution TFLOP of one forward (and backward) of `net` at `batch`, counted on
    the meta device: no memory or arithmetic spent, the same count on every card."""
    net = copy.deepcopy(net).to("meta").requires_grad_(backward)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device="meta")
    labels = torch.zeros(batch, net.label_dim, device="meta") if getattr(net, "label_dim", 0) else None
    with FlopCounterMode(display=False) as counter:
        out = net(x, torch.ones(batch, device="meta"), labels)
        if backward:
            out.sum().backward()
    return counter.get_total_flops() / 1e12


def iteration_tflop(net: torch.nn.Module, batch: int, nfe: int, solver: str = "dpmpp3m", m: int = 3,
                    teacher_afs: bool = False) -> float:
    """Model TFLOP of one SFD iteration (Algorithm 2, AFS student grid of nfe + 2 points): the teacher's
    evaluations over the refined grid plus one forward-backward per non-AFS student step."""
    teacher_points = (nfe + 1) * (m + 1) + 1
    teacher_evals = solver_nfe(solver, teacher_points, teacher_afs)
    return teacher_evals * _counted_tflop(net, batch, False) + nfe * _counted_tflop(net, batch, True)


def bench_distill(arch: str, batch: int, nfe: int, *, solver: str = "dpmpp3m", m: int = 3,
                  precision: str = "fp32", compile: bool = False, compile_mode: str | None = None,
                  channels_last: bool = False, group_norm: str = "native", warmup: int = 2, iters: int = 5,
                  device: str | None = None, compile_backend: str = "inductor") -> dict:
    device = bench_device(device)
    teacher, d = bench_distiller(arch, batch, nfe, solver, m, device, precision=precision, compile=compile,
                                 compile_mode=compile_mode, compile_backend=compile_backend,
                                 channels_last=channels_last, group_norm=group_norm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    for i in range(warmup + iters):
        if i == warmup:  # this process's CPU time (every thread) over the timed iterations
            cpu0 = time.process_time()
        _, _, t_teacher, t_student = d.sfd_iteration(nfe + 2)
        if i >= warmup:
            records.append((t_teacher + t_student, t_teacher, t_student))
    cpu_s = (time.process_time() - cpu0) / iters
    total = statistics.median(r[0] for r in records)
    tflop = iteration_tflop(teacher, batch, nfe, solver, m)
    return {
        "arch": arch, "device": device_name(device),
        "batch": batch, "nfe": nfe, "num_steps": nfe + 2, "teacher_solver": solver, "m": m,
        "precision": precision, "compile": compile, "channels_last": channels_last,
        "compile_mode": compile_mode, "group_norm": group_norm,
        "compile_fell_back": compile and not (runs_compiled(d.teacher_fwd) and runs_compiled(d.student_fwd)),
        **(graph_counts() if compile else {}),
        "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "s_per_iter": total, "cpu_s_per_iter": cpu_s, "threads": torch.get_num_threads(),
        "teacher_s": statistics.median(r[1] for r in records),
        "student_s": statistics.median(r[2] for r in records), "trajectories_per_s": batch / total,
        "peak_memory_gb": peak_memory_gb(device), "timed_iters": iters,
        "s_per_iter_min": min(r[0] for r in records), "s_per_iter_max": max(r[0] for r in records),
        "tflop_per_iter": tflop, "achieved_tflops": tflop / total,
    }


def format_distill(r: dict) -> str:
    return (f"{r['arch']} on {r['device']}: batch {r['batch']}, NFE {r['nfe']} (N={r['num_steps']}, AFS, "
            f"M={r['m']}, {r['teacher_solver']} teacher), {describe_speed(r)}\n"
            f"  {r['s_per_iter']:.4f} s/iter (median of {r['timed_iters']}) = teacher {r['teacher_s']:.4f} s"
            f" + student {r['student_s']:.4f} s; CPU {r['cpu_s_per_iter']:.4f} s/iter on {r['threads']} thread(s); "
            f"{r['trajectories_per_s']:.1f} trajectories/s; "
            f"{memory_label(r)} {r['peak_memory_gb']:.2f} GiB; {r['params_m']:.1f}M params; "
            f"{r['tflop_per_iter']:.3g} model TFLOP/iter = {r['achieved_tflops']:.3g} TFLOP/s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_options(p, [2])
    add_speed_options(p, "fp32")
    add_timing_options(p)
    p.add_argument("--solver", default="dpmpp3m")
    p.add_argument("--m", type=int, default=3)


def run(args: argparse.Namespace) -> None:
    for nfe in args.nfe:
        r = bench_distill(args.arch, args.batch, nfe, solver=args.solver, m=args.m, warmup=args.warmup,
                          iters=args.iters, **speed_options(args))
        print(json.dumps(r) if args.json else format_distill(r), flush=True)
