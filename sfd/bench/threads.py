"""`threads`: an SFD iteration's wall and CPU time at each intra-op thread count, alone and beside CPU-bound
processes (busy loops), under OpenMP's default (spinning) or passive wait policy: the measurements behind the run
setting `threads: auto` (sfd.threads). Each configuration runs `distill` in a fresh process, because OpenMP reads
its settings when PyTorch loads it; the busy loops run only while it does. Other work on the machine counts as
competition too: each line gives the load average at its start."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from sfd.bench.common import add_common_options, add_timing_options

HELP = "time SFD iterations at each thread count, alone and beside CPU-bound processes (CPU)"
# OpenMP's wait policies: spin (the default: a waiting thread spins a while before it sleeps) or passive (it sleeps)
POLICIES = {"spin": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
BUSY_LOOP = "while True: pass"
CHECKOUT = Path(__file__).resolve().parents[2]  # so the child process imports this sfd


def measure(arch: str, batch: int, nfe: int, threads: int, competitors: int, policy: str, *, warmup: int = 2,
            iters: int = 5) -> dict:
    """`distill` on the CPU in a fresh process with `threads` intra-op threads and wait `policy`, while
    `competitors` busy-loop processes run."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(filter(None, [str(CHECKOUT),
                                                                                   env.get("PYTHONPATH")])),
               **POLICIES[policy])
    command = [sys.executable, "-m", "sfd.bench", "distill", "--arch", arch, "--batch", str(batch), "--nfe", str(nfe),
               "--device", "cpu", "--warmup", str(warmup), "--iters", str(iters), "--json"]
    load = os.getloadavg()[0]
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(competitors)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.splitlines()[-1]), "policy": policy, "competitors": competitors,
            "load_before": load}


def format_threads(r: dict) -> str:
    beside = f"beside {r['competitors']} busy process(es)" if r["competitors"] else "alone"
    return (f"{r['threads']} thread(s), {r['policy']:<7} {beside:<26} {1e3 * r['s_per_iter']:8.0f} ms/iter wall "
            f"(median; {1e3 * r['s_per_iter_min']:.0f}-{1e3 * r['s_per_iter_max']:.0f}), "
            f"{1e3 * r['cpu_s_per_iter']:6.0f} ms/iter CPU; load average {r['load_before']:.1f} at start")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_options(p, [2])
    add_timing_options(p)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts to time")
    p.add_argument("--competitors", type=int, nargs="+", default=[0, 1],
                   help="how many busy-loop processes run beside each configuration")
    p.add_argument("--policy", nargs="+", choices=list(POLICIES), default=["spin", "passive"],
                   help="OpenMP wait policies to time")


def run(args: argparse.Namespace) -> None:
    for competitors in args.competitors:
        for policy in args.policy:
            for threads in args.threads:
                r = measure(args.arch, args.batch, args.nfe[0], threads, competitors, policy, warmup=args.warmup,
                            iters=args.iters)
                print(json.dumps(r) if args.json else format_threads(r), flush=True)
