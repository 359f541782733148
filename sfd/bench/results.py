"""`show`: saved `--json` results as a markdown timing table (distill, suite), then `track` and `sample`
summaries."""
from __future__ import annotations

import argparse
import json

from sfd.bench.sample import format_sample
from sfd.bench.track import format_track

HELP = "a markdown table of results saved with --json"


def timing_table(rows: list[dict]) -> str:
    """A markdown table of `distill`/`suite` results (JSON objects), one line per setting and NFE."""
    head = ("| device | setting | NFE | s/iter (min–max) | teacher s | student s | trajectories/s | peak GiB "
            "| TFLOP/s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        name = r.get("setting") or r.get("precision", "?")
        if "error" in r:
            lines.append(f"| {r.get('device', '?')} | {name} | {r['nfe']} | failed: {r['error'][:80]} | | | | | |")
            continue
        if r.get("compile_fell_back"):
            name += " (fell back to eager)"
        if r.get("graph_breaks"):
            name += f" ({r['graph_breaks']} graph breaks)"
        lines.append(f"| {r['device']} | {name} | {r['nfe']} | {r['s_per_iter']:.3f} "
                     f"({r['s_per_iter_min']:.3f}–{r['s_per_iter_max']:.3f}) | {r['teacher_s']:.3f} "
                     f"| {r['student_s']:.3f} | {r['trajectories_per_s']:.0f} | {r['peak_memory_gb']:.1f} "
                     f"| {r['achieved_tflops']:.3g} |")
    return "\n".join(lines)


def show(paths: list[str]) -> str:
    """Read JSON lines written by `--json` runs: a timing table for distill/suite rows, then `track` and `sample`
    summaries."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip().startswith("{")]
    timings = [r for r in rows if "s_per_iter" in r or "error" in r]
    tracks = [r for r in rows if "weights_apart_over_moved" in r]
    samples = [r for r in rows if "sampling_images_per_s" in r]
    parts = [timing_table(timings)] if timings else []
    parts += [format_track(r) for r in tracks] + [format_sample(r) for r in samples]
    if not parts:
        raise SystemExit(f"error: no benchmark results (JSON lines from --json) in {', '.join(paths)}")
    return "\n\n".join(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+")


def run(args: argparse.Namespace) -> None:
    print(show(args.files))
