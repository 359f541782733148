#!/usr/bin/env python
"""Run one experiment: distil, evaluate, log to MLflow.

    python experiments/run.py experiments/digits_sfd.yaml [key=value ...] [--smoke] [--dry-run]

`key=value` overrides use dotted config keys with YAML-typed values (student.nfe=3, student.afs=false,
loss.name=pseudo_huber). `--dry-run` validates, checks assets (reading a checkpoint teacher whole) and prints the
resolved config without creating anything. The run's `config.yaml` artifact replays it: `python experiments/run.py <that file>`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiments/<name>.yaml, or a config.yaml logged by an earlier run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--smoke", action="store_true",
                   help="tiny budget with a randomly initialised teacher of the same architecture (tagged smoke)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config; create nothing")
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment name (default: experiments, or experiments-smoke with --smoke)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                   "sqlite:///<repo>/runs/mlflow.db)")
    p.add_argument("--progress", action="store_true", help="show a progress bar while evaluating")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sfd.assets import AssetError
    from sfd.config import ConfigError, dump_yaml, load_config
    from sfd.runner import check_teacher_checkpoint, prepare, run_experiment

    try:
        from sfd.tracking import default_tracking_uri, tracking_uri_problem

        uri = args.tracking_uri or default_tracking_uri()
        problem = tracking_uri_problem(uri, connect=True)
        if problem:  # before the config and its teacher are read, not when the run starts
            raise ConfigError(f"MLflow tracking URI {uri!r} (--tracking-uri): {problem}")
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            cfg, notes = prepare(cfg, smoke=args.smoke, tracking_uri=args.tracking_uri)
            check_teacher_checkpoint(cfg)
            print(dump_yaml(cfg), end="")
            for key, note in notes.items():
                print(f"# {key}: {note}")
            return 0
        from sfd.tracking import Tracker, fail_orphaned_runs

        experiment = args.experiment or ("experiments-smoke" if args.smoke or cfg.smoke else "experiments")
        tracker = Tracker(experiment, tracking_uri=args.tracking_uri)
        for run_id in fail_orphaned_runs(tracker.client):  # e.g. an earlier run of this script ended by kill -9
            print(f"note: run {run_id} was left RUNNING by a process of this host that is gone; marked FAILED")
        result = run_experiment(cfg, tracker=tracker, smoke=args.smoke, progress=args.progress)
    except (ConfigError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items())
    print(f"run {result.run_id} ({result.config.name}) {result.status}: {metrics}")
    print(f"tracking: {tracker.tracking_uri}, experiment {experiment!r}")
    return 0


if __name__ == "__main__":
    from sfd.signals import run_script

    sys.exit(run_script(main))  # SIGTERM stops it the way Ctrl-C does: open runs end KILLED
