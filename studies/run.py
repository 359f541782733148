#!/usr/bin/env python
"""Run a study: an Optuna study whose every trial is one tracked SFD run (MLflow child of the study's run).

    python studies/run.py <study> [--smoke] [--seeds 0 1 2] [--storage URL] [--tracking-uri URI] [--n-trials N]
                          [--no-report] [--retry-failed] [--devices auto|serial|all|cuda:0 cuda:1 ...]
                          [--heartbeat S] [--dry-run] [--quiet]
    python studies/run.py --list

`<study>` is a name in studies/ (e.g. ablation_digits) or a path to a study YAML. Table studies (`rows:`)
enqueue one trial per row, in the paper's order (one per row and seed when the study lists `seeds:`, so
the report can say mean ± sd; `--seeds` does that for any table study, as a study of its own named
`<study>-seeds-0-1-2`); search studies (`space:`) let a seeded sampler pick.
Re-running the same command resumes: finished trials are kept, a trial whose process died has its finished
run adopted or else its MLflow run marked FAILED and, like trials stopped by Ctrl-C or SIGTERM (their runs end
KILLED), its row / parameters tried again; failed trials stay failed unless `--retry-failed`. Everything that
can be wrong in the study or its rows (a typo, a bad value, a missing checkpoint or data set, a store that does
not answer) is reported before any MLflow experiment or Optuna study is created.
`--devices` runs up to one trial per listed device at once, each in a worker process of its own (a
second-stage row waits for its first stage); this process alone writes the Optuna study. By default (`auto`) a
table study whose rows run on the CPU runs one row per core side by side, each run on one thread (the run setting
`threads: auto`); `serial` runs one trial at a time in this process. On a terminal the study says which trial
starts and draws bars over its training iterations and evaluation samples (`--quiet`: none).
Many machines: give every one the same command with a PostgreSQL `--storage` and an `mlflow server`
`--tracking-uri`; the peers share the study's queue, and a peer's trial whose heartbeat stops (every
`--heartbeat` seconds, as the study was created with; dead after three times that) is run again by another.

The study engine is the library package `sfd.study`; this script parses the options, prints, and builds the
report (`reports.build`) at the end.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: sfd/ and reports/ importable

from optuna.trial import FrozenTrial, TrialState

from reports.build import ReportError, build_report, check_out_dir
from sfd.assets import AssetError
from sfd.config import ConfigError
from sfd.progress import wanted
from sfd.signals import run_script
from sfd.study import (HEARTBEAT_S, StudyError, StudyOutcome, StudyPlan, StudySpec, available_studies, load_spec,
                       objective_labels, plan_study, row_key, run_study, shown_trial)


def list_studies() -> None:
    for path in available_studies():
        try:
            spec = load_spec(str(path))
            size = f"{len(spec.rows)} rows" if spec.rows else f"{spec.n_trials} trials ({spec.sampler})"
            first = spec.description.split(". ")[0].rstrip(".")
            print(f"{spec.name:<24} {spec.kind:<10} {size:<18} {'/'.join(spec.metrics):<28} {first}")
        except StudyError as exc:
            print(f"{path.stem:<24} INVALID    {exc}")


def print_plan(plan: StudyPlan) -> None:
    print(f"study {plan.name}: dry run, nothing created. {plan.to_run} trial(s) would run now.")
    print(f"  Optuna {plan.storage}, study {plan.optuna_study!r}: "
          + (f"{plan.on_record} trial(s) on record" if plan.on_record else "new"))
    print(f"  MLflow {plan.tracking_uri}, experiment {plan.optuna_study!r}")
    print("  trials run " + (f"side by side on {' '.join(plan.devices)}, one worker process each" if plan.devices
                             else "one at a time, in this process"))
    if plan.running_elsewhere:
        print(f"  being run now by {plan.running_elsewhere}: a run of this command would be refused until it ends")
    if plan.assumption:
        print(f"  assuming {plan.assumption}")
    width = max(len(label) for label, _, _ in plan.lines)
    wide = max(len(how) for _, _, how in plan.lines)
    for label, what, how in plan.lines:
        print(f"  {label:<{width}}  {how:<{wide}}  {what}")


def print_summary(spec: StudySpec, trials: list[FrozenTrial], smoke: bool = False) -> None:
    """One line per row and seed (the trial it shows) in a table study, per completed trial in a search."""
    head = (f"{'row / trial':<40} {'state':<9} " + " ".join(f"{m:>18}" for m in objective_labels(spec, smoke))
            + f" {'train s':>9}")
    print(head)
    print("-" * len(head))

    def line(label: str, t: FrozenTrial) -> None:
        values = t.values or [math.nan] * len(spec.metrics)
        train = t.user_attrs.get("train/wall_s")
        print(f"{label:<40} {t.state.name:<9} " + " ".join(f"{v:>18.5g}" for v in values)
              + f" {train if train is not None else math.nan:>9.1f}")

    if spec.rows:
        for row in spec.rows:
            for seed in spec.replicates():
                label = row["id"] + (f" seed {seed}" if seed is not None else "")
                shown = shown_trial([t for t in trials if row_key(t) == (row["id"], seed)])
                if shown is None:
                    print(f"{label:<40} {'NOT RUN':<9}")
                else:
                    line(label, shown)
    else:
        for t in trials:
            if t.state == TrialState.COMPLETE:
                shown = ",".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in t.params.values())
                line(f"trial {t.number} {shown}", t)


def report(outcome: StudyOutcome, args: argparse.Namespace) -> bool:
    """Build the study's report (reports/build.py); False, with the reason on stderr, when it cannot be built
    (the trials are done and tracked either way)."""
    try:
        path = build_report(outcome.name, storage=outcome.storage, tracking_uri=outcome.tracking_uri,
                            out_dir=args.out, smoke=args.smoke)
    except Exception as exc:  # noqa: BLE001 - say why the report is not there; the exit status says so too
        print(f"error: the report could not be built: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False
    print(f"report: {path}")
    return True


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or -1 trials would create the study's runs and do nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}; a positive integer")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", help="a study name in studies/ or a path to a study YAML")
    p.add_argument("--list", action="store_true", help="list the studies, one line each")
    p.add_argument("--smoke", action="store_true", help="tiny budget (an EDM checkpoint teacher becomes a randomly "
                   "initialised network of its architecture); tagged smoke, logged to <study>-smoke")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///<runs>/optuna.db, "
                   "<runs> = $SFD_RUNS_DIR or <repo>/runs); the study's lock goes beside a sqlite file")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                   "sqlite:///<repo>/runs/mlflow.db)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run every row once per seed, as the study "
                   "<study>-seeds-<seeds>; the report gives mean ± sd")
    p.add_argument("--n-trials", type=positive_int, default=None,
                   help="run at most N >= 1 trials now (rows: the next N rows)")
    p.add_argument("--retry-failed", action="store_true", help="also retry rows / trials that failed")
    p.add_argument("--devices", nargs="+", default=["auto"], metavar="DEVICE",
                   help="run trials side by side, one worker process per entry (cpu or cuda:<index>; repeat an "
                   "entry to share it), e.g. --devices cuda:0 cuda:1, or all (every CUDA device); serial: one "
                   "trial at a time in this process, on each config's device; auto (default): one CPU worker per "
                   "core for a table study whose rows run on the CPU, else serial")
    p.add_argument("--heartbeat", type=positive_int, default=None, metavar="S",
                   help=f"a new study: record each running trial's heartbeat every S seconds (default {HEARTBEAT_S}); "
                   "a trial whose heartbeat is older than 3*S is taken for dead and run again. A study keeps the S it "
                   "was created with, for every peer")
    p.add_argument("--dry-run", action="store_true", help="check the study and print what a run would do now "
                   "(each row's settings and whether it runs, is done or stays failed); create nothing")
    p.add_argument("--quiet", action="store_true", help="no progress (which trial starts, bars); they are shown "
                   "only on a terminal anyway. Each finished trial's line and the summary are still printed")
    p.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    p.add_argument("--out", default=None, help="report folder (default: the report builder's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        list_studies()
        return 0
    if not args.study:
        print("error: name a study (or --list)", file=sys.stderr)
        return 2
    options = dict(smoke=args.smoke, storage=args.storage, tracking_uri=args.tracking_uri, n_trials=args.n_trials,
                   retry_failed=args.retry_failed, seeds=args.seeds, devices=args.devices, heartbeat_s=args.heartbeat)
    try:
        if not args.no_report and args.out is not None:
            check_out_dir(args.out)  # before the trials run rather than after
        if args.dry_run:
            plan = plan_study(args.study, **options)
            print_plan(plan)
            if plan.missing is not None:  # the plan stands; a run of it would stop before anything
                print(f"error: a run would stop before creating anything: {plan.missing}", file=sys.stderr)
                return 2
            return 0
        outcome = run_study(args.study, progress=wanted(args.quiet), **options)
    except ReportError as exc:
        print(f"error: --out: {exc}", file=sys.stderr)
        return 2
    except (StudyError, ConfigError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(outcome.spec, outcome.study.get_trials(deepcopy=False), args.smoke)
    print(f"study wall time {outcome.seconds:.1f}s ({outcome.ran} trial(s) this invocation; parent run "
          f"{outcome.parent_run_id}, metric invocation/wall_s)")
    if outcome.others_running and not args.no_report:
        print(f"report: not built, {outcome.others_running} trial(s) still run in other processes; the last one to "
              "end builds it (or run reports/build.py then)")
    reported = args.no_report or outcome.others_running or report(outcome, args)
    if outcome.failed:
        print(f"{len(outcome.failed)} trial(s) failed: " + "; ".join(f"#{n}: {r}" for n, r in outcome.failed),
              file=sys.stderr)
        return 1
    return 0 if reported else 3


if __name__ == "__main__":
    sys.exit(run_script(main))  # SIGTERM stops it the way Ctrl-C does: open runs end KILLED
