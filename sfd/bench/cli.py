"""`python -m sfd.bench TOOL ...` (also `sfd bench TOOL ...`): every argument is checked before any work, each
failure a one-line error with exit status 2; then the tool runs. The tools, in the order `--help` lists them,
are the modules of this package named in TOOLS: each gives its `HELP`, `add_arguments(parser)` and `run(args)`."""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import torch

from sfd.bench import distill, layout, profile, results, sample, suite, threads, track
from sfd.bench.common import ARCHS
from sfd.solvers import SOLVERS

DESCRIPTION = "Benchmark SFD distillation: `python -m sfd.bench distill --arch cifar10 --batch 128 --nfe 2`."
TOOLS = {"distill": distill, "track": track, "suite": suite, "profile": profile, "sample": sample, "layout": layout,
         "threads": threads, "show": results}


def _refuse(message: str) -> NoReturn:
    """A bad argument: one line on stderr and exit status 2, before anything is built or timed."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_counts(args: argparse.Namespace) -> None:
    """Counts must be positive (warm-up and --m may be 0)."""
    for name in ("batch", "iters", "num", "samples", "top"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            _refuse(f"--{name} must be at least 1, got {value}")
    for name in ("warmup", "m"):
        if getattr(args, name, 0) < 0:
            _refuse(f"--{name} must be at least 0, got {getattr(args, name)}")
    for name, least in (("nfe", 1), ("threads", 1), ("competitors", 0)):
        if any(n < least for n in getattr(args, name, None) or []):
            _refuse(f"--{name} must be at least {least}, got {getattr(args, name)}")


def _check_device(name: str | None) -> None:
    """cpu, or a CUDA device this process sees: torch would otherwise fail mid-setup with a traceback."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        _refuse(f"--device {name!r} is not a device this benchmark runs on; use cpu, cuda or cuda:<index>")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        _refuse(f"--device {name}: this process sees {count} CUDA device(s); use --device cpu"
                + (f" or cuda:0 to cuda:{count - 1}" if count else ""))


def _check_args(args: argparse.Namespace) -> None:
    """Every argument checked before any work, each failure a one-line error (exit 2)."""
    _check_counts(args)
    if getattr(args, "arch", "tiny") not in ("tiny", *ARCHS):
        _refuse(f"unknown --arch {args.arch!r}; choose from tiny, {', '.join(ARCHS)}")
    _check_device(getattr(args, "device", None))
    if getattr(args, "solver", None) is not None and args.solver not in SOLVERS:
        _refuse(f"unknown --solver {args.solver!r}; choose from {', '.join(sorted(SOLVERS))}")
    for path in getattr(args, "files", None) or []:
        if not os.path.isfile(path):
            _refuse(f"show: {path} {'is a folder' if os.path.isdir(path) else 'does not exist'}; "
                    "pass files holding the JSON lines that --json runs print")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sfd.bench", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    for name, tool in TOOLS.items():
        tool.add_arguments(sub.add_parser(name, help=tool.HELP))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _check_args(args)
    TOOLS[args.command].run(args)
    return 0
