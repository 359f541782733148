#!/usr/bin/env python
"""Run one experiment: distil, evaluate, log to MLflow.

    python experiments/run.py experiments/digits_sfd.yaml [key=value ...] [--smoke] [--dry-run]

`key=value` overrides use dotted config keys with YAML-typed values (student.nfe=3, student.afs=false,
loss.name=pseudo_huber); the run is named after the YAML and its overrides (`digits_sfd student.nfe=3`, unless
`name=` is one of them) and tagged `sfd.overrides`. `--dry-run` validates, checks assets (reading a checkpoint teacher whole) and prints the
resolved config without creating anything. The run's `config.yaml` artifact replays it: `python experiments/run.py <that file>`.

`ddp=N` (N > 1) runs the one run on N processes: the script replaces itself with `torchrun --standalone
--nproc-per-node N` running the same command line (or start it under torchrun yourself; the config's ddp then
follows torchrun). `--result-file PATH` (default $SFD_RESULT_FILE) receives the run's outcome as JSON
(sfd.runner.outcome); `--parent-run-id`, `--tag` and `--objective` log it as a study's child run.
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
    p.add_argument("--quiet", action="store_true", help="no progress bars (they are shown only on a terminal anyway)")
    p.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    p.add_argument("--result-file", default=os.environ.get("SFD_RESULT_FILE") or None, metavar="PATH",
                   help="write the run's outcome (status, run id, metrics, objective) here as JSON "
                        "(default: $SFD_RESULT_FILE)")
    p.add_argument("--parent-run-id", default=None, help="log the run as a child of this MLflow run")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a tag on the run (repeatable)")
    p.add_argument("--objective", action="append", default=[], metavar="METRIC",
                   help="a metric also logged as `objective` (repeatable: objective, objective_1, ...)")
    p.add_argument("--save-student", action="store_true",
                   help="log the student's weights even for a smoke run's large random network")
    return p.parse_args(argv)


def parse_tags(items: list[str]) -> dict[str, str]:
    from sfd.config import ConfigError

    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag: got {item!r}; expected KEY=VALUE")
        tags[key] = value
    return tags


def named_after_overrides(cfg, overrides: list[str]):
    """The config named after its YAML and the overrides (`digits_sfd student.nfe=3 loss.name=l2`), so that runs of
    one YAML can be told apart in the MLflow UI; an override of `name` itself stands as given. A path is shown by its
    file name, and a name longer than a run name may be is cut short (the `sfd.overrides` tag keeps them whole)."""
    from sfd.config import replace
    from sfd.config.validation import MAX_NAME_LENGTH

    if not overrides or any(o.partition("=")[0].strip() == "name" for o in overrides):
        return cfg
    shown = []
    for override in overrides:
        key, sep, value = override.partition("=")
        shown.append(key + sep + (os.path.basename(value.rstrip("/")) if "/" in value else value))
    name = " ".join([cfg.name, *shown])
    return replace(cfg, {"name": name if len(name) <= MAX_NAME_LENGTH else name[:MAX_NAME_LENGTH - 1] + "…"})


def relaunch_under_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process with torchrun running this script on `nproc` processes (it never returns). Launched by
    a study, torchrun is stopped when the study process dies (sfd.distributed.stop_with_parent)."""
    from sfd.distributed import stop_with_parent, torchrun_command

    stop_with_parent()
    command = torchrun_command(nproc, str(Path(__file__).resolve()), argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from sfd.assets import AssetError
    from sfd.config import ConfigError, dump_yaml, load_config
    from sfd.distributed import launched_rank, launched_world_size
    from sfd.runner import OutcomeFile, check_ddp, check_teacher_checkpoint, prepare, resolve_device, run_experiment
    from sfd.progress import terminal_bars, wanted
    from sfd.tracking import (TAG_OVERRIDES, Tracker, default_tracking_uri, fail_orphaned_runs, name_problem,
                              tracking_uri_problem)

    outcome = OutcomeFile(args.result_file)
    try:
        with outcome.reporting():
            if args.experiment is not None and name_problem(args.experiment):  # it names the artifacts' folder
                raise ConfigError(f"--experiment: {name_problem(args.experiment)}")
            uri = args.tracking_uri or default_tracking_uri()
            problem = tracking_uri_problem(uri, connect=True)
            if problem:  # before the config and its teacher are read, not when the run starts
                raise ConfigError(f"MLflow tracking URI {uri!r} (--tracking-uri): {problem}")
            tags = parse_tags(args.tag)
            cfg = named_after_overrides(load_config(args.config, args.overrides), args.overrides)
            if args.overrides:
                tags.setdefault(TAG_OVERRIDES, " ".join(args.overrides))
            if args.dry_run:
                cfg, notes = prepare(cfg, smoke=args.smoke, tracking_uri=args.tracking_uri)
                check_teacher_checkpoint(cfg)
                print(dump_yaml(cfg), end="")
                for key, note in notes.items():
                    print(f"# {key}: {note}")
                return 0
            if cfg.ddp > 1 and launched_world_size() == 1:
                check_ddp(cfg, resolve_device(cfg.device), launched=False)
                relaunch_under_torchrun(cfg.ddp, argv)
            experiment = args.experiment or ("experiments-smoke" if args.smoke or cfg.smoke else "experiments")

            def started(run_id: str) -> None:  # the store exists now (the run's checks passed): tidy it up
                outcome.started(run_id)
                for orphan in fail_orphaned_runs(tracker.client):  # e.g. an earlier run of this script, kill -9
                    print(f"note: run {orphan} was left RUNNING by a process of this host that is gone; marked FAILED")

            tracker = Tracker(experiment, tracking_uri=args.tracking_uri, parent_run_id=args.parent_run_id, tags=tags,
                              objective=args.objective, on_start=started)
            bars = terminal_bars if args.progress or wanted(args.quiet) else None
            result = run_experiment(cfg, tracker=tracker, smoke=args.smoke, progress=bars,
                                    save_student=True if args.save_student else None)
            outcome.finished(result)
    except (ConfigError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if launched_rank() == 0:  # under torchrun the other ranks have nothing to say
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items())
        print(f"run {result.run_id} ({result.config.name}) {result.status}: {metrics}")
        print(f"tracking: {tracker.tracking_uri}, experiment {experiment!r}")
    return 0


if __name__ == "__main__":
    from sfd.signals import run_script

    sys.exit(run_script(main))  # SIGTERM stops it the way Ctrl-C does: open runs end KILLED
