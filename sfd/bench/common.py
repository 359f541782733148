"""What the speed tools share: the networks they time, the device, memory and compiler bookkeeping, the
command-line options they have in common, and a result's speed setting in words."""
from __future__ import annotations

import argparse
import resource

import torch

from sfd.distill import DistillSettings, Distiller, make_student
from sfd.networks.edm import GROUP_NORMS, EDMPrecond, build_edm
from sfd.sampling import PRECISIONS, GridSpec

TINY = dict(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[], dropout=0.0)
# --arch -> the EDM network it builds (`tiny`: TINY)
ARCHS = {"cifar10": "cifar10-32x32-uncond-vp", "imagenet64": "imagenet-64x64-cond-adm",
         "ffhq64": "ffhq-64x64-uncond-vp"}


def build_arch(arch: str) -> torch.nn.Module:
    if arch == "tiny":
        return EDMPrecond(**TINY)
    if arch not in ARCHS:
        raise SystemExit(f"error: unknown --arch {arch!r}; choose from tiny, {', '.join(ARCHS)}")
    return build_edm(ARCHS[arch])


def bench_device(device: str | None) -> torch.device:
    """The device asked for, else CUDA where there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset (each benchmark resets before its warm-up, so compile and
    cuDNN autotuning workspaces count). CPU: the process's peak RSS over its whole life, printed as such."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux -> GiB (process RSS)


def memory_label(r: dict) -> str:
    return "peak memory" if r["device"] != "cpu" else "process peak RSS"


def fresh_compiler_state(device: torch.device) -> None:
    """Each configuration starts clean, eager ones included: no compiled graphs, recompile budget or CUDA-graph
    memory pools left by the setting before (they would count in this one's peak memory), and graph counters
    that count this configuration only."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graph_counts() -> dict:
    """Graphs compiled and graph breaks since the configuration was set up: a graph break splits the network
    into pieces compiled apart, which costs fusion across the break and a return to Python at each."""
    counters = torch._dynamo.utils.counters
    return {"graphs_compiled": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def bench_distiller(arch: str, batch: int, nfe: int, solver: str, m: int, device: torch.device,
                    **speed) -> tuple[torch.nn.Module, Distiller]:
    """A random teacher of `arch` and a Distiller for it, set up the way every benchmark times it."""
    # TF32 and cuDNN's autotuner are set by the Distiller, as in a run (sfd.sampling.use_precision, cudnn_autotune)
    fresh_compiler_state(device)
    torch.manual_seed(0)
    teacher = build_arch(arch).to(device).eval().requires_grad_(False)
    settings = DistillSettings(grid=GridSpec(num_steps=nfe + 2, afs=True), teacher_solver=solver, m=m,
                               batch_size=batch, total_kimg=1e6, num_classes=getattr(teacher, "label_dim", 0),
                               **speed)
    d = Distiller(teacher, make_student(teacher), settings, device=device)
    d.shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    return teacher, d


def describe_speed(r: dict) -> str:
    """The speed setting of a result in words, e.g. "bf16, compiled reduce-overhead, channels-last"."""
    words = [r["precision"]]
    if r["compile"]:
        words.append("compiled" + (f" {r['compile_mode']}" if r.get("compile_mode") else "")
                     + (" (FELL BACK TO EAGER)" if r.get("compile_fell_back") else "")
                     + (f" ({r['graph_breaks']} GRAPH BREAKS)" if r.get("graph_breaks") else ""))
    if r["channels_last"]:
        words.append("channels-last")
    if r.get("group_norm", "native") != "native":
        words.append(f"group norm {r['group_norm']}")
    return ", ".join(words)


# ----- command-line options several tools take ----------------------------------------------------------

def add_common_options(p: argparse.ArgumentParser, default_nfe: list[int]) -> None:
    p.add_argument("--arch", default="tiny", help="tiny | cifar10 | imagenet64 | ffhq64")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--nfe", type=int, nargs="+", default=default_nfe)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object per configuration")


def add_speed_options(p: argparse.ArgumentParser, default_precision: str) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=default_precision)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, help="e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--group-norm", choices=GROUP_NORMS, default="native",
                   help="channel-stats: group statistics from per-channel ones (for compiled channels-last)")


def add_timing_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)


def speed_options(args: argparse.Namespace) -> dict:
    """The speed options and device of a parsed command line, as the tools take them."""
    return dict(precision=args.precision, compile=args.compile, compile_mode=args.compile_mode,
                channels_last=args.channels_last, group_norm=args.group_norm, device=args.device)
