"""`track`: distil the same random teacher twice, in fp32 and in a faster setting (bf16 by default), from the
same seeds, and show how far apart the two runs end up compared with how far training moved them."""
from __future__ import annotations

import argparse
import json
import math

import torch

from sfd.bench.common import (add_common_options, add_speed_options, bench_device, build_arch, describe_speed,
                              device_name, speed_options)
from sfd.distill import DistillSettings, Distiller, make_student
from sfd.sampling import GridSpec, generate

HELP = "distil in fp32 and in a faster setting; show the runs track each other"


def excite(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give EDM's zero-initialised layers (each block's last conv, attention projections, the output conv)
    random weights, so a freshly initialised teacher is a non-trivial function of its input rather than
    almost exactly c_skip·x."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and float(p.abs().max()) < 1e-3:
                fan_in = p[0].numel()
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * math.sqrt(1 / fan_in))
    return net


def _flat_params(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in net.parameters()])


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def without_dropout(net: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability of an EDM network (block dropout, label dropout) to 0; returns `net`."""
    for module in net.modules():
        for name in ("dropout", "label_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return net


def _distil_once(teacher, settings: DistillSettings, device: torch.device,
                 dropout: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    # Each run starts the global generator (eager dropout masks) where a run does (sfd.runner): otherwise the
    # second run would draw other masks than the first merely by coming second.
    torch.manual_seed(settings.seed)
    student = make_student(teacher) if dropout else without_dropout(make_student(teacher))
    losses = []
    d = Distiller(teacher, student, settings, device=device, callback=lambda st: losses.append(st.step_losses.mean()))
    d.run((teacher.img_channels, teacher.img_resolution, teacher.img_resolution))
    return student, torch.stack(losses).cpu()


def track_precisions(arch: str, batch: int, nfe: int, iters: int, *, precision: str = "bf16",
                     compile: bool = False, compile_mode: str | None = None, channels_last: bool = False,
                     group_norm: str = "native", dropout: bool = False, lr: float = 5e-5, samples: int = 64,
                     seed: int = 0, device: str | None = None) -> dict:
    """Distil one excited random teacher in fp32 eager and in the given setting; compare the two runs.

    The students train without dropout unless `dropout`: masks are drawn in memory order (and by the compiler's
    own generator when compiled), so channels-last or compiled runs would draw other masks than the fp32 eager
    reference, and the comparison would measure that as well as the arithmetic.
    """
    device = bench_device(device)
    torch.manual_seed(seed)
    teacher = excite(build_arch(arch), seed).to(device).eval().requires_grad_(False)
    initial = _flat_params(teacher)
    common = dict(grid=GridSpec(num_steps=nfe + 2, afs=True), batch_size=batch, total_kimg=iters * batch / 1000,
                  lr=lr, seed=seed, num_classes=getattr(teacher, "label_dim", 0))
    ref, ref_losses = _distil_once(teacher, DistillSettings(**common), device, dropout)
    fast, fast_losses = _distil_once(teacher, DistillSettings(**common, precision=precision, compile=compile,
                                                              compile_mode=compile_mode,
                                                              channels_last=channels_last,
                                                              group_norm=group_norm), device, dropout)
    moved = (_flat_params(ref) - initial).norm()
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    draw = dict(grid=common["grid"], seeds=range(samples), shape=shape, device=device,
                num_classes=common["num_classes"], output_device=device)
    x_init, _ = generate(teacher, **draw)
    x_ref, _ = generate(ref.eval(), **draw)
    x_fast, _ = generate(fast.eval(), **draw, precision=precision)  # each student samples as its run would
    tail = max(1, iters // 5)
    return {
        "arch": arch, "device": device_name(device),
        "batch": batch, "nfe": nfe, "iters": iters, "precision": precision, "compile": compile,
        "channels_last": channels_last, "group_norm": group_norm, "dropout": dropout, "lr": lr,
        "loss_fp32_last_fifth": float(ref_losses[-tail:].mean()), "loss_fast_last_fifth": float(fast_losses[-tail:].mean()),
        "loss_fp32_first": float(ref_losses[0]), "loss_fast_first": float(fast_losses[0]),
        "weights_apart_over_moved": float((_flat_params(fast) - _flat_params(ref)).norm() / moved),
        "samples_rmse_fast_vs_fp32": _rmse(x_fast, x_ref), "samples_rmse_trained_vs_initial": _rmse(x_ref, x_init),
        "loss_curve_fp32": ref_losses.tolist(), "loss_curve_fast": fast_losses.tolist(),
    }


def format_track(r: dict) -> str:
    setting = describe_speed(r)
    return (f"{r['arch']} on {r['device']}: {r['iters']} SFD iterations, batch {r['batch']}, NFE {r['nfe']}, "
            f"fp32 eager vs {setting}, student dropout {'on' if r.get('dropout', True) else 'off'}\n"
            f"  mean step loss, first iteration: {r['loss_fp32_first']:.5f} vs {r['loss_fast_first']:.5f}; "
            f"last fifth: {r['loss_fp32_last_fifth']:.5f} vs {r['loss_fast_last_fifth']:.5f}\n"
            f"  students' weights apart / fp32 training's move: {r['weights_apart_over_moved']:.3f}\n"
            f"  samples RMSE, {setting} vs fp32 student: {r['samples_rmse_fast_vs_fp32']:.5f} "
            f"(fp32 student vs the untrained copy: {r['samples_rmse_trained_vs_initial']:.5f})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_options(p, [2])
    add_speed_options(p, "bf16")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--dropout", action="store_true",
                   help="keep the student's dropout (its masks then differ between the two runs' layouts)")


def run(args: argparse.Namespace) -> None:
    for nfe in args.nfe:
        r = track_precisions(args.arch, args.batch, nfe, args.iters, lr=args.lr, samples=args.samples,
                             dropout=args.dropout, **speed_options(args))
        print(json.dumps(r) if args.json else format_track(r), flush=True)
