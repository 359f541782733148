#!/usr/bin/env python
"""Run a study: an Optuna study whose every trial is one tracked SFD run (MLflow child of the study's run).

    python studies/run.py <study> [--smoke] [--seeds 0 1 2] [--storage URL] [--n-trials N] [--no-report]
                          [--retry-failed] [--devices cuda:0 cuda:1 ...] [--dry-run]
    python studies/run.py --list

`<study>` is a name in studies/ (e.g. ablation_digits) or a path to a study YAML. Table studies (`rows:`)
enqueue one trial per row, in the paper's order (one per row and seed when the study lists `seeds:`, so
the report can say mean ± sd; `--seeds` does that for any table study, as a study of its own named
`<study>-seeds-0-1-2`); search studies (`space:`) let a seeded sampler pick.
Re-running the same command resumes: finished trials are kept, trials left RUNNING by a dead process are
marked FAILED (their MLflow runs too) and, like trials stopped by Ctrl-C or SIGTERM (their runs end KILLED),
their rows / parameters are tried again; failed trials stay failed unless `--retry-failed`. Everything that
can be wrong in the study or its rows (a typo, a bad value, a missing checkpoint or data set) is reported
before any MLflow experiment or Optuna study is created.
`--devices` runs up to one trial per listed device at once, each in a worker process of its own (a
second-stage row waits for its first stage); this process alone writes the Optuna study.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout; also makes reports/ importable

STUDIES_DIR = Path(__file__).resolve().parent
KINDS = ("ablation", "comparison", "search")
SAMPLERS = ("rows", "grid", "tpe", "random", "nsga2")
DIRECTIONS = ("minimize", "maximize")
# What a run logs that a study may optimise (the evaluation metrics plus cost).
OBJECTIVE_METRICS = ("fid", "fd_digits", "pixel_fd", "class_accuracy", "teacher_gap_mean", "teacher_gap_std",
                     "train/device_hours", "train/wall_s", "total/wall_s", "nfe")
SPEC_KEYS = ("name", "kind", "description", "base", "overrides", "objective", "sampler", "n_trials", "rows",
             "space", "skip_rows", "seeds")
ROW_KEYS_REQUIRED = ("id", "params")
OBJECTIVE_KEYS = ("metric", "metrics", "direction", "directions")
SAMPLER_KEYS = ("type", "seed")
DISTRIBUTION_KEYS = {"categorical": ("choices",), "float": ("low", "high", "log"), "int": ("low", "high", "log")}
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SMOKE_SEARCH_TRIALS = 3
INTERRUPTED = "interrupted: the study process stopped during this trial"
NOT_STARTED = "interrupted: not started"


class StudyError(ValueError):
    """A bad study definition: the message names the study, the field and what is allowed."""


@dataclass
class StudySpec:
    name: str
    kind: str
    description: str
    base: Path
    overrides: dict
    metrics: list[str]
    directions: list[str]
    sampler: str
    seed: int
    n_trials: int
    rows: list[dict] = field(default_factory=list)
    space: dict = field(default_factory=dict)
    skip_rows: dict = field(default_factory=dict)  # row id -> why it is not run (shown in the report)
    path: Path | None = None
    seeds: list[int] | None = None  # table studies: run every row once per seed (replicates)

    def replicates(self) -> list[int | None]:
        """The seeds each row runs with; [None] means once, with the seed its config gives."""
        return list(self.seeds) if self.seeds else [None]

    def experiment(self, smoke: bool) -> str:
        return f"{self.name}-smoke" if smoke else self.name


# ----- study files ---------------------------------------------------------------------------------------

def study_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return STUDIES_DIR / f"{name_or_path}.yaml"


def available_studies() -> list[Path]:
    return sorted(STUDIES_DIR.glob("*.yaml"))


def _fail(where: str, message: str) -> StudyError:
    return StudyError(f"study {where}: {message}")


def load_spec(name_or_path: str) -> StudySpec:
    """Read and check a study YAML (structure only; `build_configs` checks every run config)."""
    import difflib

    import yaml

    path = study_path(name_or_path)
    if path.is_dir():
        raise StudyError(f"{name_or_path!r} is a folder; name a study (see --list) or a study YAML file")
    if not path.is_file():
        names = [p.stem for p in available_studies()]
        close = difflib.get_close_matches(str(name_or_path), names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known studies: {', '.join(names)}"
        raise StudyError(f"no study {name_or_path!r} ({path} does not exist); {hint}")
    where = path.stem
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise _fail(where, f"{path} is not valid YAML: {exc}") from None
    if data is None:
        raise _fail(where, f"{path} is empty; a study YAML needs name, kind, base, objective and rows or space")
    if not isinstance(data, dict):
        raise _fail(where, "the file must be a mapping")
    for key in data:
        if not isinstance(key, str):
            raise _fail(where, f"field names are words, got {key!r}; allowed: {', '.join(SPEC_KEYS)}")
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(key, SPEC_KEYS, n=2)
            raise _fail(where, f"unknown field {key!r}" + (f"; did you mean {' or '.join(close)}?" if close
                                                          else f"; allowed: {', '.join(SPEC_KEYS)}"))
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise _fail(where, f"name: got {name!r}; letters, digits, '_', '.' and '-' only (it names the MLflow "
                    "experiment, the Optuna study and folders), starting with a letter or digit")
    kind = data.get("kind")
    if kind not in KINDS:
        raise _fail(where, f"kind: got {kind!r}; allowed: {', '.join(KINDS)}")
    if "base" not in data:
        raise _fail(where, "base: missing; name an experiments/*.yaml file to start from")
    base = Path(data["base"])
    base = base if base.is_absolute() else ROOT / base
    if not base.is_file():
        raise _fail(where, f"base: {data['base']!r} " + ("is a folder; name an experiments/*.yaml file"
                                                        if base.is_dir() else "does not exist"))
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise _fail(where, f"overrides: expected a mapping of config keys, got {overrides!r}")

    objective = _section(where, data, "objective", OBJECTIVE_KEYS)
    metrics = objective.get("metrics", objective.get("metric"))
    directions = objective.get("directions", objective.get("direction", "minimize"))
    metrics = [metrics] if isinstance(metrics, str) else list(metrics or [])
    directions = [directions] * len(metrics) if isinstance(directions, str) else list(directions)
    if not metrics:
        raise _fail(where, "objective.metric: missing; name the metric(s) to optimise, e.g. fd_digits")
    for m in metrics:
        if m not in OBJECTIVE_METRICS:
            raise _fail(where, f"objective.metric: got {m!r}; allowed: {', '.join(OBJECTIVE_METRICS)}")
    if len(directions) != len(metrics) or any(d not in DIRECTIONS for d in directions):
        raise _fail(where, f"objective.direction: got {directions!r}; one of {', '.join(DIRECTIONS)} per metric")

    sampler = _section(where, data, "sampler", SAMPLER_KEYS)
    stype = sampler.get("type", "rows" if "rows" in data else "tpe")
    if stype not in SAMPLERS:
        raise _fail(where, f"sampler.type: got {stype!r}; allowed: {', '.join(SAMPLERS)}")
    seed = sampler.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(where, f"sampler.seed: got {seed!r}; an integer (samplers are always seeded)")

    rows, space = data.get("rows"), data.get("space")
    if (rows is None) == (space is None):
        raise _fail(where, "give either rows: (a table study) or space: (a search study), not both or neither")
    if (rows is not None) != (kind != "search"):
        raise _fail(where, f"kind: {kind!r} " + ("searches a space:; a study with rows: is an ablation or a "
                                                  "comparison" if kind == "search" else
                                                  "is a table study with rows:; a space: is searched by kind "
                                                  "'search'"))
    if rows is not None:
        if stype != "rows":
            raise _fail(where, f"sampler.type: a study with rows: uses 'rows', got {stype!r}")
        if "n_trials" in data:
            raise _fail(where, "n_trials: a table study runs each of its rows once; to run fewer now, pass "
                        "--n-trials N")
        _check_rows(where, rows)
        n_trials = len(rows)
    else:
        if stype == "rows":
            raise _fail(where, "sampler.type: 'rows' needs rows:; a space: is searched with grid, tpe, random or nsga2")
        _check_space(where, space, stype)
        n_trials = data.get("n_trials") or (math.prod(len(s["choices"]) for s in space.values())
                                            if stype == "grid" else None)
        if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
            raise _fail(where, f"n_trials: got {data.get('n_trials')!r}; a positive integer")
    seeds = data.get("seeds")
    if seeds is not None:
        _check_seeds(where, seeds, rows is not None)
    skip_rows = data.get("skip_rows") or {}
    _check_skip_rows(where, skip_rows, rows)
    return StudySpec(name=name, kind=kind, description=str(data.get("description", "")).strip(), base=base,
                     overrides=overrides, metrics=metrics, directions=directions, sampler=stype, seed=seed,
                     n_trials=n_trials * len(seeds or [None]), rows=rows or [], space=space or {},
                     skip_rows=skip_rows, path=path, seeds=seeds)


def _section(where: str, data: dict, name: str, allowed: tuple[str, ...]) -> dict:
    """A mapping field of the study (objective, sampler) whose keys are all known: a typo would be ignored."""
    import difflib

    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise _fail(where, f"{name}: expected a mapping with keys {', '.join(allowed)}, got {section!r}")
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            raise _fail(where, f"{name}: unknown key {key!r}" + (f"; did you mean {close[0]}?" if close
                                                                 else f"; allowed: {', '.join(allowed)}"))
    return section


def _check_skip_rows(where: str, skip_rows, rows) -> None:
    """`skip_rows` maps ids of this study's rows to reasons; an unknown id names the close ones."""
    import difflib

    if not isinstance(skip_rows, dict):
        raise _fail(where, f"skip_rows: expected a mapping of row ids to reasons, got {skip_rows!r}")
    if skip_rows and rows is None:
        raise _fail(where, "skip_rows: skipping is for table studies (rows:); a search has no row ids")
    ids = [str(r["id"]) for r in rows or []]
    for row_id in skip_rows:
        if str(row_id) not in ids:
            close = difflib.get_close_matches(str(row_id), ids, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise _fail(where, f"skip_rows: {row_id!r} is not a row id of this study; {hint}rows: {', '.join(ids)}")


def _check_seeds(where: str, seeds, table: bool) -> None:
    if not table:
        raise _fail(where, "seeds: replicates are for table studies (rows:); a search varies its own trials")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
        raise _fail(where, f"seeds: got {seeds!r}; a non-empty list of distinct integers >= 0, e.g. [0, 1, 2]")


def with_seeds(spec: StudySpec, seeds: list[int]) -> tuple[StudySpec, str]:
    """The table study replicated over `seeds` (`--seeds`), as a study of its own: its name says the seeds,
    so its runs never mix with the single-seed study's. Returns it and the YAML that defines it (the original
    plus `name` and `seeds`), which `run_study` saves beside the stores once every check has passed."""
    import yaml

    _check_seeds(spec.name, list(seeds), bool(spec.rows))
    name = f"{spec.name}-seeds-{'-'.join(str(x) for x in seeds)}"
    data = yaml.safe_load(spec.path.read_text()) if spec.path else {}
    data.update(name=name, seeds=list(seeds), base=str(spec.base))  # base made absolute: the copy lives elsewhere
    replicated = dataclasses.replace(spec, name=name, seeds=list(seeds),
                                     n_trials=len(spec.rows) * len(seeds), path=None)
    return replicated, yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _check_rows(where: str, rows) -> None:
    if not isinstance(rows, list) or not rows:
        raise _fail(where, "rows: expected a non-empty list")
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS_REQUIRED):
            raise _fail(where, f"rows[{i}]: each row needs {' and '.join(ROW_KEYS_REQUIRED)}, got {row!r}")
        if not isinstance(row["id"], str) or not row["id"].strip():
            raise _fail(where, f"rows[{i}]: id must be a non-empty string, got {row['id']!r} (quote it: "
                        f"id: '{row['id']}')")
        if row["id"] in seen:
            raise _fail(where, f"rows[{i}]: duplicate id {row['id']!r}")
        if not isinstance(row["params"], dict):
            raise _fail(where, f"rows[{i}] ({row['id']}): params must map config keys to values")
        seen.add(row["id"])


def _check_space(where: str, space, sampler: str) -> None:
    from sfd.config import ConfigError, set_value

    if not isinstance(space, dict) or not space:
        raise _fail(where, "space: expected a mapping of config keys to distributions")
    for key, dist in space.items():
        try:
            set_value({}, key, None)
        except ConfigError as exc:
            raise _fail(where, f"space: {exc}") from None
        kind = dist.get("type") if isinstance(dist, dict) else None
        if kind not in DISTRIBUTION_KEYS:
            raise _fail(where, f"space.{key}: type must be categorical, float or int, got {dist!r}")
        unknown = [k for k in dist if k != "type" and k not in DISTRIBUTION_KEYS[kind]]
        if unknown:
            raise _fail(where, f"space.{key}: unknown key {unknown[0]!r} for a {kind} distribution; allowed: "
                        f"type, {', '.join(DISTRIBUTION_KEYS[kind])}")
        if kind == "categorical":
            if not isinstance(dist.get("choices"), list) or not dist["choices"]:
                raise _fail(where, f"space.{key}: categorical needs a non-empty choices list, got "
                            f"{dist.get('choices')!r}")
            continue
        if sampler == "grid":
            raise _fail(where, f"space.{key}: the grid sampler takes categorical choices only")
        if not all(k in dist for k in ("low", "high")):
            raise _fail(where, f"space.{key}: {kind} needs low and high, got {dist!r}")
        dist["low"], dist["high"] = (_bound(where, f"space.{key}.{k}", dist[k], kind) for k in ("low", "high"))
        if not dist["low"] < dist["high"]:
            raise _fail(where, f"space.{key}: {kind} needs low < high, got {dist!r}")
        if not isinstance(dist.get("log", False), bool):
            raise _fail(where, f"space.{key}.log: got {dist['log']!r}; true or false")


def _bound(where: str, key: str, value, kind: str) -> float | int:
    """An end of a float / int range as a number. YAML reads `2e-3` (no dot) as a string; it means 0.002."""
    if kind == "float" and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (isinstance(value, (int, float)) if kind == "float" else isinstance(value, int)) and \
        not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise _fail(where, f"{key}: got {value!r}; a finite {'number' if kind == 'float' else 'integer'}")
    return float(value) if kind == "float" else value


# ----- configs (validated, assets checked: nothing is created) ----------------------------------------------

def base_data(spec: StudySpec) -> dict:
    from sfd.config import merge, read_yaml

    return merge(read_yaml(spec.base), spec.overrides)


def row_config(spec: StudySpec, row: dict):
    from sfd.config import ConfigError, from_dict, merge, validate

    try:
        data = merge(base_data(spec), {"name": f"{spec.name}/{row['id']}", **row["params"]})
        return validate(from_dict(data))
    except ConfigError as exc:
        raise ConfigError(f"study {spec.name}, row {row['id']}: {exc}") from None


def trial_config(spec: StudySpec, params: dict, number: int):
    from sfd.config import from_dict, merge, validate

    return validate(from_dict(merge(base_data(spec), {"name": f"{spec.name}/trial-{number}", **params})))


def first_stage_row(spec: StudySpec, row: dict) -> str | None:
    """The row id a second-stage row names as its first stage (`second_stage.first_stage: row:<id>`), else
    None."""
    from sfd.runner import ROW_REF_PREFIX

    ref = row["params"].get("second_stage.first_stage",
                            (row["params"].get("second_stage") or {}).get("first_stage"))
    if ref is None:
        ref = (spec.overrides.get("second_stage.first_stage")
               or (spec.overrides.get("second_stage") or {}).get("first_stage"))
    if isinstance(ref, str) and ref.startswith(ROW_REF_PREFIX):
        return ref[len(ROW_REF_PREFIX):].strip()
    return None


def row_key(trial) -> tuple:
    """(row id, replicate seed) of a table study's trial: what the study runs once."""
    return trial.user_attrs.get("row"), trial.user_attrs.get("seed")


def row_trials(study, row_id: str, seed: int | None) -> list:
    """Every trial of one row (and replicate seed), oldest first."""
    return [t for t in study.get_trials(deepcopy=False) if row_key(t) == (row_id, seed)]


def first_stage_run_id(spec: StudySpec, study, row_id: str, target: str, seed: int | None = None) -> str:
    """The MLflow run id of row `target`'s latest finished trial in this study (row `row_id` names it as its
    first stage; with replicates, the trial of the same seed), or a StudyError saying why there is none."""
    from optuna.trial import TrialState

    mine = row_trials(study, target, seed)
    done = [t for t in mine if t.state == TrialState.COMPLETE and t.user_attrs.get("mlflow_run_id")]
    if done:
        return done[-1].user_attrs["mlflow_run_id"]
    if mine:
        last = mine[-1]
        why = f"its latest trial (#{last.number}) is {last.state.name}"
        if last.user_attrs.get("fail_reason"):
            why += f": {last.user_attrs['fail_reason'][:300]}"
    else:
        why = "it has not been run"
    raise StudyError(f"study {spec.name}, row {row_id}: its first stage is row {target!r}, which has not finished "
                     f"({why}); rows run in YAML order, so fix that row (or --retry-failed) and run the study again")


def check_study(spec: StudySpec, smoke: bool, tracking_uri: str | None = None,
                teacher_device: str | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """Validate every row's config (search: the base and each categorical choice) and check its assets.
    Returns ({row id: reason} for the rows the study YAML skips (`skip_rows`), which are not checked, and
    {row id (search: "base"): resolved run config}). Creates nothing. A checkpoint teacher is read onto `teacher_device` (default: the run's device; `cpu` when the
    trials run in workers, so this process holds no GPU memory)."""
    from sfd.assets import MissingAssetError
    from sfd.config import ConfigError
    from sfd.runner import check_teacher_checkpoint, computed_metrics, objective_key, prepare, sampling_info

    skipped = {row: str(reason) for row, reason in spec.skip_rows.items()}

    def check(make_config, where: str, first_stage_info: dict | None = None):
        try:
            resolved, _ = prepare(make_config(), smoke=smoke, tracking_uri=tracking_uri,
                                  first_stage_info=first_stage_info)
            check_teacher_checkpoint(resolved, teacher_device)  # kept for trials run in this process
        except ConfigError as exc:
            text = str(exc)
            raise ConfigError(text if text.startswith(f"study {spec.name},") else
                              f"study {spec.name}, {where}: {text}") from None
        missing = [m for m in spec.metrics if objective_key(m, smoke) not in computed_metrics(resolved)]
        if missing:
            raise ConfigError(f"study {spec.name}, {where}: objective {missing} is not among the metrics the run "
                              f"computes (eval.metrics={resolved.eval.metrics}); add it to eval.metrics")
        return resolved

    if spec.rows:
        resolved_rows: dict[str, Any] = {}
        for row in spec.rows:
            if row["id"] in skipped:
                continue
            info = None
            target = first_stage_row(spec, row)
            if target is not None:  # its first stage is an earlier row: check that row's grid, not a model
                if target not in resolved_rows:
                    order = [r["id"] for r in spec.rows]
                    why = ("is skipped by the study (skip_rows)" if target in skipped else
                           "comes later in the YAML (rows run in YAML order)" if target in order else
                           f"is not a row of this study (rows: {', '.join(order)})")
                    raise StudyError(f"study {spec.name}, row {row['id']}: second_stage.first_stage names row "
                                     f"{target!r}, which {why}")
                first = resolved_rows[target]
                if first.algorithm in ("baseline", "reference"):  # it trains no student to start from
                    raise StudyError(f"study {spec.name}, row {row['id']}: second_stage.first_stage names row "
                                     f"{target!r}, which trains no student (algorithm={first.algorithm}); name a "
                                     "training row, or give a reference student's .pkl path")
                info = sampling_info(first, 0, step_condition=first.algorithm == "sfd-v")
            try:
                resolved_rows[row["id"]] = check(lambda: row_config(spec, row), f"row {row['id']}", info)
            except MissingAssetError as exc:
                raise MissingAssetError(f"study {spec.name}, row {row['id']}: {exc}") from None
        return skipped, resolved_rows
    base = check(lambda: trial_config(spec, {}, 0), "base")
    for key, dist in spec.space.items():
        for value in space_values(dist):
            check(lambda: trial_config(spec, {key: value}, 0), f"space.{key}={value!r}")
    return skipped, {"base": base}


def space_values(dist: dict) -> list:
    """The values of a distribution that the checks try: every choice, every value of an int range of up to
    64 (some settings allow only some NFEs), else the two ends."""
    if dist["type"] == "categorical":
        return list(dist["choices"])
    if dist["type"] == "int" and dist["high"] - dist["low"] < 64:
        return list(range(dist["low"], dist["high"] + 1))
    return [dist["low"], dist["high"]]


# ----- what a study recorded, against its YAML now -----------------------------------------------------------

def recorded_study(storage_url: str, study_name: str):
    """The Optuna study as stored, or None when it does not exist yet. Never creates a sqlite file or a study."""
    import optuna

    from sfd.tracking import sqlite_path

    path = sqlite_path(storage_url)
    if path is not None and not path.expanduser().exists():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:  # no such study in the storage
        return None


# Run-config keys that say how a run is carried out, not what it measures (results agree to rounding, or to
# dropout masks drawn in another memory order): a study may change them between trials.
EXECUTION_KEYS = ("name", "device", "precision", "compile", "compile_mode", "channels_last", "group_norm",
                  "eval.compile", "eval.batch_size", "log.every")


def recorded_config(cfg) -> dict:
    """A trial's run config as recorded on the trial (flat, JSON types, without EXECUTION_KEYS): what a resumed
    study compares with the config its YAML gives now."""
    import json

    from sfd.config import flatten, to_dict

    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in EXECUTION_KEYS}
    return json.loads(json.dumps(flat))


def shown_trials(spec: StudySpec, study, retry_failed: bool) -> list:
    """The finished trials a report shows and a resume keeps: each row's (and seed's) latest complete trial,
    else its latest failure unless it is retried; every complete (or kept failed) trial of a search."""
    from optuna.trial import TrialState

    def kept(t) -> bool:
        return t.state == TrialState.COMPLETE or (
            t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") and not retry_failed)

    trials = study.get_trials(deepcopy=False)
    if not spec.rows:
        return [t for t in trials if kept(t)]
    latest: dict = {}
    for t in trials:  # in trial order: a later complete trial replaces an earlier one, a failure never does
        key = row_key(t)
        if t.state == TrialState.COMPLETE or (key not in latest or latest[key].state != TrialState.COMPLETE):
            latest[key] = t
    return [t for t in latest.values() if kept(t)]


def check_record(spec: StudySpec, study, retry_failed: bool) -> None:
    """Refuse to resume a study whose YAML no longer describes what it ran: another objective (Optuna keeps
    a study's), or a finished row whose config the YAML (or its base) now gives differently (the report would
    label the old result with the new settings)."""
    def objective(metrics, directions) -> str:
        return ", ".join(f"{m} ({d})" for m, d in zip(metrics, directions))

    metrics = study.user_attrs.get("objective_metrics", spec.metrics)
    directions = [d.name.lower() for d in study.directions]
    if list(metrics) != spec.metrics or directions != spec.directions:
        raise StudyError(f"study {spec.name}: its Optuna study optimises {objective(metrics, directions)}, but the "
                         f"YAML now asks for {objective(spec.metrics, spec.directions)}; a study keeps its "
                         "objective, so give the YAML a new name: (the runs so far stay under the old one)")
    rows = {r["id"]: r for r in spec.rows}
    row_now: dict = {}  # once per row, not per seed
    changed = []
    for t in shown_trials(spec, study, retry_failed):
        row = rows.get(t.user_attrs.get("row"))
        if "config" not in t.user_attrs or (spec.rows and (row is None or row["id"] in spec.skip_rows)):
            continue  # recorded before this check, or not shown (a row dropped or skipped)
        if spec.rows and row["id"] not in row_now:
            row_now[row["id"]] = recorded_config(row_config(spec, row))
        now = row_now[row["id"]] if spec.rows else recorded_config(trial_config(spec, t.params, t.number))
        then = t.user_attrs["config"]
        diff = [f"{k}: {then[k]!r} -> {now[k]!r}" for k in sorted(set(then) & set(now)) if then[k] != now[k]]
        if diff:  # (a key on one side only is a schema change between versions, not an edit)
            what = f"row {row['id']!r}" if spec.rows else f"trial {t.number}"
            changed.append(f"{what} ({'; '.join(diff)})")
    if changed:
        way_out = ("give each changed row a new id (the old result stays under the old id)" if spec.rows else
                   "give the YAML a new name: for a new search")
        raise StudyError(f"study {spec.name}: finished trials ran with settings the YAML no longer gives, so the "
                         f"report would show their results under settings they did not use: {', '.join(changed)}. "
                         f"To run the new settings, {way_out}; or restore the YAML"
                         + ("; a failed row also reruns with --retry-failed" if spec.rows and not retry_failed
                            else ""))


# ----- Optuna ----------------------------------------------------------------------------------------------

def make_sampler(spec: StudySpec, parallel: bool = False):
    """The study's seeded sampler. With trials running side by side TPE assumes the running ones scored badly
    (constant liar), so parallel workers do not all try the same point."""
    import optuna

    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, constant_liar=parallel)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    if spec.sampler == "grid":
        class StudyGridSampler(optuna.samplers.GridSampler):
            def after_trial(self, study, trial, state, values) -> None:
                """Optuna's calls `study.stop()` at the grid's end, which works only inside `study.optimize`;
                the trial loop asks `is_exhausted` before each new trial instead."""

        return StudyGridSampler({k: d["choices"] for k, d in spec.space.items()}, seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=spec.seed)  # "rows": every trial is enqueued; "random"


def suggest(trial, key: str, dist: dict):
    if dist["type"] == "categorical":
        return trial.suggest_categorical(key, dist["choices"])
    if dist["type"] == "float":
        return trial.suggest_float(key, dist["low"], dist["high"], log=bool(dist.get("log", False)))
    return trial.suggest_int(key, dist["low"], dist["high"], log=bool(dist.get("log", False)))


def recover_interrupted(study, storage, client) -> list:
    """Trials left RUNNING by a process that died: their MLflow runs and themselves end FAILED. Returns them."""
    from optuna.trial import TrialState

    from sfd.tracking import mark_failed

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                if client.get_run(run_id).info.status == "RUNNING":
                    mark_failed(client, run_id, INTERRUPTED)
            except Exception as exc:  # noqa: BLE001 - a missing run must not block the resume
                print(f"note: could not mark MLflow run {run_id} failed: {exc}", file=sys.stderr)
        interrupt_stored(storage, trial, INTERRUPTED)
    return stale


def interrupt_stored(storage, trial, reason: str) -> None:
    """Mark a trial this process did not ask for (RUNNING or WAITING) interrupted: FAIL, rerun next time."""
    from optuna.trial import TrialState

    storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
    storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
    storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)


def rows_left(spec: StudySpec, trials: list, retry_failed: bool, skipped: dict) -> tuple[list, list]:
    """(queued, new): the (row, seed) keys of the trials already waiting, and the keys still to enqueue, in the
    order they run. A row is done once it completed, or failed for a reason of its own (unless retried)."""
    from optuna.trial import TrialState

    done = {row_key(t) for t in trials if t.state == TrialState.COMPLETE}
    if not retry_failed:  # failed for a reason of their own (not interrupted): stay failed
        done |= {row_key(t) for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")}
    dropped = {t.number for t, _ in unlisted_queue(spec, trials, skipped)}
    queued = [row_key(t) for t in trials if t.state == TrialState.WAITING and t.number not in dropped]
    new = [(r["id"], seed) for r in spec.rows for seed in spec.replicates()
           if r["id"] not in skipped and (r["id"], seed) not in done | set(queued)]
    return queued, new


def unlisted_queue(spec: StudySpec, trials: list, skipped: dict) -> list[tuple[Any, str]]:
    """Queued trials of rows the YAML now skips or no longer has, with why they will not run."""
    from optuna.trial import TrialState

    ids = {r["id"] for r in spec.rows}
    out = []
    for t in trials:
        row = t.user_attrs.get("row")
        if t.state == TrialState.WAITING and spec.rows and (row in skipped or row not in ids):
            why = (f"the study skips row {row!r} ({skipped[row]})" if row in skipped else
                   f"the study YAML no longer has row {row!r}")
            out.append((t, f"{NOT_STARTED}: {why}"))
    return out


def search_left(spec: StudySpec, trials: list, retry_failed: bool, limit: int | None) -> tuple[list[dict], int]:
    """(retry, count): parameters to enqueue again and how many trials to run now."""
    from optuna.trial import TrialState

    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    failed = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")]
    finished = completed + ([] if retry_failed else failed)
    # Retry exactly the parameters that were interrupted (killed, Ctrl-C, SIGTERM) and not tried since (and,
    # when asked, those that failed), once each. A trial still RUNNING here was left so by a process that ended
    # (a run recovers those first; a dry run sees them as they are).
    stopped = [t for t in trials if t.state == TrialState.RUNNING
               or (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))]
    interrupted = [t for t in stopped if t.params not in [u.params for u in trials if u.number > t.number]]
    have = [t.params for t in completed + waiting]
    retry = []
    for t in interrupted + (failed if retry_failed else []):
        if t.params and t.params not in have:
            retry.append(dict(t.params))
            have.append(t.params)
    target = spec.n_trials if limit is None else min(spec.n_trials, len(finished) + limit)
    return retry, max(0, target - len(finished))


def plan_trials(spec: StudySpec, study, retry_failed: bool, skipped: dict, limit: int | None) -> int:
    """Enqueue what is left to do and return how many trials to run now."""
    trials = study.get_trials(deepcopy=False)
    if spec.rows:
        queued, new = rows_left(spec, trials, retry_failed, skipped)
        for row_id, seed in new:  # user attributes, not parameters: rows may be added to the YAML later
            study.enqueue_trial({}, user_attrs={"row": row_id, **({"seed": seed} if seed is not None else {})})
        n = len(queued) + len(new)
        return n if limit is None else min(n, limit)
    retry, n = search_left(spec, trials, retry_failed, limit)
    for params in retry:
        study.enqueue_trial(params)
    return n


# ----- running the trials ---------------------------------------------------------------------------------

class TrialLoop:
    """Ask Optuna for each trial, run it as a tracked run (in this process, or in one worker process per device)
    and tell Optuna the outcome. Only this process writes to the Optuna study."""

    def __init__(self, spec: StudySpec, study, smoke: bool, experiment: str, tracking_uri: str, parent_id: str,
                 say):
        self.spec, self.study, self.smoke, self.say = spec, study, smoke, say
        self.experiment, self.tracking_uri, self.parent_id = experiment, tracking_uri, parent_id
        self.rows = {r["id"]: r for r in spec.rows}
        self.first_stages = {first_stage_row(spec, r) for r in spec.rows} - {None}  # rows a second stage starts from
        self.failed: list[tuple[int, str]] = []
        self.started = 0  # trials started in this invocation (at most the planned number)
        self.ran = 0  # trials that ended (complete or failed) in this invocation

    # one trial

    def label(self, trial) -> str:
        seed = trial.user_attrs.get("seed")
        name = trial.user_attrs.get("row") if self.rows else None
        return (name or f"trial {trial.number}") + (f" seed {seed}" if seed is not None else "")

    def job(self, trial, worker=None):
        """The trial's run: its row's (or the sampler's) config, its tags, where it is logged. Raises if the
        trial cannot run (a row the YAML no longer has, a first stage that did not finish)."""
        from sfd import tracking as T
        from sfd.config import replace
        from sfd.workers import Job

        spec = self.spec
        row_id = trial.user_attrs.get("row") if self.rows else None
        tags = {T.TAG_STUDY: spec.name, T.TAG_TRIAL: trial.number, T.TAG_KIND: spec.kind}
        if row_id is not None:
            tags[T.TAG_ROW] = row_id
        if self.rows:
            if row_id not in self.rows:
                raise StudyError(f"study {spec.name}: trial {trial.number} names row {row_id!r}, which the study "
                                 "YAML no longer has")
            cfg = row_config(spec, self.rows[row_id])
            trial.set_user_attr("config", recorded_config(cfg))
            seed = trial.user_attrs.get("seed")
            if seed is not None:
                cfg = replace(cfg, {"seed": seed})
            target = first_stage_row(spec, self.rows[row_id])
            if target is not None:
                cfg = replace(cfg, {"second_stage.first_stage": first_stage_run_id(spec, self.study, row_id, target,
                                                                                   seed)})
                tags["sfd.first_stage_row"] = target
        else:
            cfg = trial_config(spec, self.suggest_params(trial), trial.number)
            trial.set_user_attr("config", recorded_config(cfg))
        if worker is not None:
            cfg = replace(cfg, {"device": worker.config_device})
            tags["sfd.worker_device"] = worker.device
        return Job(cfg, self.experiment, self.tracking_uri, self.parent_id, tags, list(spec.metrics), self.smoke,
                   save_student=True if row_id in self.first_stages else None)

    def finish(self, trial, objective: list[float], metrics: dict, t0: float) -> None:
        if any(math.isnan(v) for v in objective):  # Optuna would fail it without a reason
            self.fail(trial, f"ObjectiveNotANumber: the run finished but its objective is {objective}", t0)
            return
        for key in ("train/wall_s", "train/device_hours", "total/wall_s", "nfe"):
            trial.set_user_attr(key, metrics.get(key))
        self.study.tell(trial, objective[0] if len(objective) == 1 else list(objective))
        self.ran += 1
        shown = ", ".join(f"{m}={v:.4g}" for m, v in zip(objective_labels(self.spec, self.smoke), objective))
        took = metrics.get("total/wall_s")  # the run's own tracked wall time
        self.say(f"[{trial.number}] {self.label(trial)}: {shown}" + (f" ({took:.1f}s)" if took is not None else ""))

    def fail(self, trial, reason: str, t0: float) -> None:
        """The trial failed for a reason of its own: recorded, and the study goes on."""
        from optuna.trial import TrialState

        trial.set_user_attr("fail_reason", reason[:2000])
        self.failed.append((trial.number, reason))
        self.study.tell(trial, state=TrialState.FAIL)
        self.ran += 1
        self.say(f"[{trial.number}] {self.label(trial)}: FAILED after {time.perf_counter() - t0:.1f}s: {reason}")

    def interrupt(self, trial, how: str, why: str = INTERRUPTED) -> None:
        """Stopped (Ctrl-C, SIGTERM) or not started: not the trial's fault; a rerun of the study tries it again."""
        from optuna.trial import TrialState

        trial.set_user_attr("fail_reason", f"{why} ({how})"[:2000])
        trial.set_user_attr("interrupted", True)
        self.study.tell(trial, state=TrialState.FAIL)

    # which trial next

    def waits_for(self, trial) -> tuple | None:
        """(row, seed) of the first stage a second-stage row trains from, else None."""
        row = self.rows.get(trial.user_attrs.get("row"))
        target = first_stage_row(self.spec, row) if row is not None else None
        return None if target is None else (target, trial.user_attrs.get("seed"))

    def waiting(self) -> list:
        from optuna.trial import TrialState

        return self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))

    def grid_done(self) -> bool:
        """A grid search has started every point and no retry is queued. (Optuna's `is_exhausted` counts only
        finished points, so trials running side by side would repeat a point.)"""
        from optuna.trial import TrialState

        size = math.prod(len(d["choices"]) for d in self.spec.space.values())
        started = {t.system_attrs.get("grid_id") for t in self.study.get_trials(deepcopy=False)
                   if t.state != TrialState.WAITING} - {None}
        return len(started) >= size and not self.waiting()

    def can_ask(self) -> bool:
        """A table study asks only for its queued rows; a grid search stops at the grid's end."""
        if self.rows:
            return bool(self.waiting())
        return not (self.spec.sampler == "grid" and self.grid_done())

    def next_trial(self, held: list, busy: list):
        """A trial ready to start, or None. A second-stage row is held back while its first stage is running,
        held or still queued (a resumed study queues a retried first stage after the rows already waiting)."""
        def ready(trial) -> bool:
            blockers = [t for t in busy + held if t is not trial] + self.waiting()
            return self.waits_for(trial) not in {row_key(t) for t in blockers}

        for trial in held:
            if ready(trial):
                held.remove(trial)
                return trial
        while self.can_ask():
            trial = self.study.ask()
            if not self.rows:  # at once: a trial stopped before its run still has its point, so it is retried
                self.suggest_params(trial)
            if ready(trial):
                return trial
            held.append(trial)
        return None

    def suggest_params(self, trial) -> dict:
        """The search trial's point (asking again returns the same values)."""
        return {k: suggest(trial, k, d) for k, d in self.spec.space.items()}

    def not_started(self, held: list, todo: int) -> None:
        """Second-stage rows asked for but not run (the `--n-trials` limit was reached while they waited for
        their first stage): queued again by the next run of the study."""
        for trial in held:
            self.interrupt(trial, f"--n-trials {todo} was reached while it waited for its first stage row "
                           f"{self.waits_for(trial)[0]!r}", why=NOT_STARTED)
        held.clear()

    def first_stage_interrupted(self, trial) -> str | None:
        """The first-stage row whose latest trial was interrupted (its worker was stopped), if this trial is a
        second stage waiting for it; that row runs again next time, and so must this one."""
        key = self.waits_for(trial)
        if key is None:
            return None
        mine = row_trials(self.study, *key)
        return key[0] if mine and mine[-1].user_attrs.get("interrupted") else None

    # in this process

    def run_here(self, todo: int) -> None:
        from sfd.signals import stops_deferred
        from sfd.workers import run_job

        held: list = []
        trial = None  # the trial asked for and not yet told
        try:
            while self.started < todo:
                with stops_deferred():  # a stop while asking lands once the trial is ours to mark
                    trial = self.next_trial(held, [])
                    if trial is None:
                        break
                    self.started += 1
                t0 = time.perf_counter()
                try:
                    result = run_job(self.job(trial),
                                     on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))
                except Exception as exc:  # noqa: BLE001 - recorded as the trial's failure
                    with stops_deferred():
                        self.fail(trial, f"{type(exc).__name__}: {exc}", t0)
                        trial = None
                else:
                    with stops_deferred():
                        self.finish(trial, result.objective, result.metrics, t0)
                        trial = None
        except KeyboardInterrupt as exc:
            for stopped in [trial, *held]:  # the run, and second stages waiting for it
                if stopped is not None:
                    self._quietly(self.interrupt, stopped, f"{type(exc).__name__}: {exc}")
            raise
        self.not_started(held, todo)

    # side by side, one worker process per device

    def run_on(self, devices: list[str], todo: int) -> None:
        from multiprocessing.connection import wait

        from sfd.signals import stops_deferred
        from sfd.workers import DeviceWorker

        cpu_workers = sum(d == "cpu" for d in devices)
        workers = [DeviceWorker(d, cpu_workers) for d in devices]
        running: dict = {}  # worker -> (trial, start time)
        held: list = []
        try:
            while True:
                for worker in workers:
                    while worker not in running and self.started < todo:
                        with stops_deferred():  # asked for, then held or running: never in between at a stop
                            trial = self.next_trial(held, [t for t, _ in running.values()])
                            if trial is None:
                                break
                            self.started += 1
                            self.start(worker, trial, running)
                if not running:
                    break
                ready = wait([w.conn for w in running])
                for worker in [w for w in running if w.conn in ready]:
                    with stops_deferred():
                        self.take(worker, worker.receive(), running)
            self.not_started(held, todo)
        except BaseException as exc:  # Ctrl-C, SIGTERM, or this process failed: stop the workers' runs cleanly
            self.stop(running, held, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            for worker in workers:
                worker.close()

    def start(self, worker, trial, running: dict) -> None:
        t0 = time.perf_counter()
        target = self.first_stage_interrupted(trial)
        if target is not None:
            self.interrupt(trial, f"its first stage row {target!r} was interrupted", why=NOT_STARTED)
            return
        try:
            job = self.job(trial, worker)
        except Exception as exc:  # noqa: BLE001 - recorded as the trial's failure
            self.fail(trial, f"{type(exc).__name__}: {exc}", t0)
            return
        worker.submit(job)
        running[worker] = (trial, t0)
        self.say(f"[{trial.number}] {self.label(trial)}: started on {worker.device}")

    def take(self, worker, message: tuple, running: dict) -> None:
        """Act on a worker's message: its run exists, or the trial is over."""
        trial, t0 = running[worker]
        kind = message[0]
        if kind == "started":
            trial.set_user_attr("mlflow_run_id", message[1])
            return
        if kind == "done":
            self.finish(trial, message[1], message[2], t0)
        elif kind == "interrupted":  # the worker alone was stopped (SIGTERM): a rerun tries the trial again
            worker.retire()
            self.interrupt(trial, message[1], why=f"interrupted: the worker on {worker.device} was stopped")
            self.say(f"[{trial.number}] {self.label(trial)}: interrupted on {worker.device}: {message[1]}")
        else:  # "failed", or "died" (the process ended: out of memory, a crash)
            if kind == "died":
                self.end_dead_run(trial, message[1])
            self.fail(trial, message[1], t0)
        del running[worker]  # only once told: should telling fail, `stop` still marks the trial

    def end_dead_run(self, trial, reason: str) -> None:
        """A worker that died left its trial's MLflow run RUNNING: end it FAILED with the reason."""
        from sfd.tracking import get_client, mark_failed

        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            mark_failed(get_client(self.tracking_uri), run_id, reason)

    def stop(self, running: dict, held: list, how: str) -> None:
        """The study process was stopped: stop every busy worker (its run ends KILLED), keep what finished, and
        mark the rest interrupted so the next run of the study tries them again."""
        from multiprocessing.connection import wait

        from sfd.workers import STOP_WAIT_S

        for worker in running:
            worker.interrupt()
        deadline = time.monotonic() + STOP_WAIT_S
        while running and time.monotonic() < deadline:
            ready = wait([w.conn for w in running], timeout=max(0.0, deadline - time.monotonic()))
            for worker in [w for w in running if w.conn in ready]:
                message = worker.receive()
                if message[0] in ("started", "done", "failed"):  # the run began, or ended before the stop
                    self._quietly(self.take, worker, message, running)
                    if message[0] != "started" and worker in running:  # its outcome could not be recorded
                        self._quietly(self.interrupt, running.pop(worker)[0], how)
                else:  # stopped, or gone: the trial was interrupted by this stop
                    worker.retire()
                    self._quietly(self.interrupt, running.pop(worker)[0], how)
        for trial, _ in list(running.values()) + [(t, None) for t in held]:
            self._quietly(self.interrupt, trial, how)
        running.clear()
        held.clear()

    @staticmethod
    def _quietly(action, *args) -> None:
        """While stopping: one trial that cannot be recorded (a storage error) must not keep the others
        RUNNING; the next start of the study recovers it."""
        try:
            action(*args)
        except Exception as exc:  # noqa: BLE001
            print(f"note: while stopping: {type(exc).__name__}: {exc}", file=sys.stderr)


# ----- the study ------------------------------------------------------------------------------------------

def study_home(storage_url: str) -> Path:
    """Where a study's own files go (its lock, the YAML `--seeds` writes): beside a sqlite Optuna storage, so
    a study run with `--storage` elsewhere keeps them together; else the runs folder ($SFD_RUNS_DIR)."""
    from sfd.tracking import runs_dir, sqlite_path

    path = sqlite_path(storage_url)
    return path.expanduser().resolve().parent if path is not None else runs_dir()


def lock_path(study_name: str, storage_url: str) -> Path:
    import hashlib

    key = hashlib.sha1(f"{storage_url}\n{study_name}".encode()).hexdigest()[:12]
    return study_home(storage_url) / ".locks" / f"{study_name}-{key}.lock"


def lock_holder(study_name: str, storage_url: str) -> str | None:
    """Who is running the study on this machine now (the lock's note), or None; creates nothing."""
    try:
        import fcntl
    except ImportError:
        return None
    path = lock_path(study_name, storage_url)
    if not path.exists():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def study_lock(study_name: str, storage_url: str):
    """Hold an exclusive lock on (storage, study) for as long as the study runs on this machine.

    A resume marks every RUNNING trial as interrupted, which is only right when no other process is running
    the study. The lock is an OS file lock, released when the process ends in any way (SIGKILL too), so a
    crashed run never blocks the next one; a second live process is refused before it touches anything."""
    try:
        import fcntl
    except ImportError:  # no POSIX file locks (Windows): run unguarded
        yield
        return
    path = lock_path(study_name, storage_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StudyError(f"study {study_name!r} in {storage_url} is already being run by {holder} on this "
                             f"machine (lock {path}); run one process per study and re-run this command after "
                             "it ends to resume") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

@dataclass
class CheckedStudy:
    spec: StudySpec
    spec_text: str | None  # the YAML of a `--seeds` study, written only when it runs
    tracking_uri: str
    storage_url: str
    devices: list[str] | None
    skipped: dict[str, str]
    configs: dict[str, Any]  # row id (search: "base") -> resolved run config
    recorded: Any = None  # the Optuna study as stored before this run (None: a new study)


def check_everything(name_or_path: str, smoke: bool, storage: str | None, tracking_uri: str | None,
                     n_trials: int | None, seeds: list[int] | None, devices: list[str] | None,
                     retry_failed: bool) -> CheckedStudy:
    """The study, its options, every row's config and assets, and what the study recorded so far, checked;
    creates nothing."""
    from sfd import tracking as T

    if n_trials is not None and n_trials < 1:
        raise StudyError(f"n_trials: got {n_trials}; a positive integer (leave it out to run every trial left)")
    if devices is not None:
        from sfd.workers import DeviceError, resolve_devices

        try:
            devices = resolve_devices(devices)
        except DeviceError as exc:
            raise StudyError(str(exc)) from None
    spec = load_spec(name_or_path)
    spec_text = None
    if seeds is not None:
        spec, spec_text = with_seeds(spec, seeds)
    tracking_uri = tracking_uri or T.default_tracking_uri()
    storage_url = storage or T.default_optuna_storage()
    problems = {f"MLflow tracking URI {tracking_uri!r} (--tracking-uri)": T.tracking_uri_problem(tracking_uri),
                f"Optuna storage {storage_url!r} (--storage)": T.database_url_problem(storage_url)}
    for what, problem in problems.items():
        if problem:
            raise StudyError(f"{what}: {problem}")
    skipped, configs = check_study(spec, smoke, tracking_uri, teacher_device="cpu" if devices else None)
    study = recorded_study(storage_url, spec.experiment(smoke))
    if study is not None:
        check_record(spec, study, retry_failed)
    return CheckedStudy(spec, spec_text, tracking_uri, storage_url, devices, skipped, configs, study)


@dataclass
class StudyOutcome:
    name: str
    experiment: str
    parent_run_id: str
    optuna_study: str
    storage: str
    tracking_uri: str
    ran: int
    failed: list[tuple[int, str]]
    skipped: dict[str, str]
    seconds: float
    report: Path | None = None
    report_error: str | None = None


def run_study(name_or_path: str, *, smoke: bool = False, storage: str | None = None,
              tracking_uri: str | None = None, n_trials: int | None = None, retry_failed: bool = False,
              report: bool = True, out_dir: str | None = None, quiet: bool = False,
              seeds: list[int] | None = None, devices: list[str] | None = None) -> StudyOutcome:
    """Check everything, then create / resume the study and run what is left. See the module docstring."""
    start = time.perf_counter()
    from sfd import tracking as T

    if report and out_dir is not None:
        check_report_folder(out_dir)
    checked = check_everything(name_or_path, smoke, storage, tracking_uri, n_trials, seeds, devices, retry_failed)
    spec, spec_text, skipped = checked.spec, checked.spec_text, checked.skipped
    tracking_uri, storage_url, devices = checked.tracking_uri, checked.storage_url, checked.devices
    if spec_text is not None:  # the replicated study's own YAML: logged on its parent run, read by the report
        spec.path = study_home(storage_url) / "studies" / f"{spec.name}.yaml"
        spec.path.parent.mkdir(parents=True, exist_ok=True)
        spec.path.write_text(spec_text)

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with study_lock(spec.experiment(smoke), storage_url):  # one live process per study (see study_lock)
        T.ensure_sqlite_parent(storage_url)
        experiment = spec.experiment(smoke)
        study_name = experiment
        client = T.get_client(tracking_uri)
        parent_id = T.study_parent_run(client, experiment, spec.name, {
            T.TAG_KIND: spec.kind, T.TAG_OPTUNA_STUDY: study_name, T.TAG_OPTUNA_STORAGE: storage_url,
            T.TAG_SMOKE: str(smoke).lower(), "sfd.objective": ",".join(spec.metrics),
            "sfd.directions": ",".join(spec.directions), "sfd.sampler": f"{spec.sampler}(seed={spec.seed})",
            "sfd.spec_path": str(spec.path), "mlflow.note.content": spec.description,
            "sfd.devices": " ".join(devices) if devices else "this process",
            **({"sfd.skipped_rows": "; ".join(f"{k}: {v}" for k, v in skipped.items())} if skipped else {})})
        client.log_artifact(parent_id, str(spec.path))
        optuna_storage = optuna.storages.get_storage(storage_url)
        sampler = make_sampler(spec, parallel=bool(devices) and len(devices) > 1)
        study = optuna.create_study(study_name=study_name, storage=optuna_storage, sampler=sampler,
                                    directions=spec.directions, load_if_exists=True)
        for key, value in {"mlflow_parent_run_id": parent_id, "mlflow_experiment": experiment,
                           "mlflow_tracking_uri": tracking_uri, "sfd_study": spec.name, "kind": spec.kind,
                           "spec_path": str(spec.path), "objective_metrics": spec.metrics,
                           "smoke": smoke}.items():
            study.set_user_attr(key, value)

        stale = recover_interrupted(study, optuna_storage, client)
        for trial, reason in unlisted_queue(spec, study.get_trials(deepcopy=False), skipped):
            interrupt_stored(optuna_storage, trial, reason)  # not run now; queued again if the row comes back
        T.fail_stale_children(client, parent_id, experiment)
        if smoke and spec.space and n_trials is None:
            n_trials = SMOKE_SEARCH_TRIALS
        todo = plan_trials(spec, study, retry_failed, skipped, n_trials)
        say = (lambda *a: None) if quiet else print
        if stale:
            say(f"resumed: {len(stale)} interrupted trial(s) marked FAILED and queued again")
        for row_id, reason in skipped.items():
            say(f"skipped row {row_id}: {reason}")
        say(f"study {spec.name}{' (smoke)' if smoke else ''}: {todo} trial(s) to run; MLflow {tracking_uri} "
            f"experiment {experiment!r}, Optuna {storage_url} study {study_name!r}")

        loop = TrialLoop(spec, study, smoke, experiment, tracking_uri, parent_id, say)
        ok = False
        try:
            if todo and devices:
                loop.run_on(devices, todo)
            elif todo:
                loop.run_here(todo)
            seconds = time.perf_counter() - start  # what the summary prints, tracked: one value per invocation
            client.log_metric(parent_id, "invocation/wall_s", seconds)
            client.log_metric(parent_id, "invocation/trials_run", loop.ran)
            ok = True
        finally:  # Ctrl-C / SIGTERM: the trial's run ended KILLED and the trial FAIL (interrupted); the study too
            client.set_terminated(parent_id, status="FINISHED" if ok else "KILLED")
        outcome = StudyOutcome(name=spec.name, experiment=experiment, parent_run_id=parent_id, optuna_study=study_name,
                               storage=storage_url, tracking_uri=tracking_uri, ran=loop.ran, failed=loop.failed,
                               skipped=skipped, seconds=seconds)
        if not quiet:
            print_summary(spec, study, smoke)
            print(f"study wall time {outcome.seconds:.1f}s ({outcome.ran} trial(s) this invocation; parent run "
                  f"{parent_id}, metric invocation/wall_s)")
        if report:
            try:
                outcome.report = build_report(spec.name, storage_url, tracking_uri, out_dir, smoke, say)
            except Exception as exc:  # noqa: BLE001 - the trials are done and tracked; say why the report is not
                outcome.report_error = f"{type(exc).__name__}: {exc}"
                print(f"error: the report could not be built: {outcome.report_error}", file=sys.stderr)
        return outcome


# ----- the plan, without running it ------------------------------------------------------------------------

@dataclass
class StudyPlan:
    name: str
    optuna_study: str
    storage: str
    tracking_uri: str
    on_record: int  # trials the Optuna study already holds (0: a new study)
    to_run: int  # trials a run of the same command would start now
    lines: list[tuple[str, str, str]]  # (row / trial, what a run would do, its settings)
    running_elsewhere: str | None  # the lock's note, when another process is running the study now
    assumption: str | None = None  # what the prediction takes for granted, if anything


def settings(cfg) -> str:
    """The settings a study varies, as one short line."""
    s = cfg.student
    sampled = f"{cfg.algorithm} {cfg.solver.name} NFE {s.nfe} t_min {s.t_min:g} AFS {'yes' if s.afs else 'no'}"
    if cfg.algorithm == "baseline":  # the teacher sampled directly: nothing is trained
        return sampled
    if cfg.algorithm == "reference":  # a student trained by the SFD reference implementation, evaluated as it is
        return f"reference student {cfg.reference.path} NFE {s.nfe} t_min {s.t_min:g} AFS {'yes' if s.afs else 'no'}"
    if cfg.algorithm == "sfd-v":  # one model trained over several student grids
        sampled += f" (trains N in {list(cfg.sfdv.num_steps_choices)})"
    return f"{sampled} {cfg.loss.name} {cfg.optim.total_kimg:g} kimg"


def why_again(last, live: bool) -> str:
    """Why a (row, seed) that has trials on record runs again (`live`: another process runs the study now)."""
    from optuna.trial import TrialState

    if last.state == TrialState.RUNNING:
        return "running now, in that process" if live else "runs again (left RUNNING by a process that ended)"
    if last.user_attrs.get("interrupted"):
        return "runs again (interrupted)"
    return "runs again (--retry-failed)"


def outcome_text(spec: StudySpec, smoke: bool, trial) -> str:
    if trial.values:
        shown = ", ".join(f"{m}={v:.4g}" for m, v in zip(objective_labels(spec, smoke), trial.values))
        return f"done: {shown} (trial {trial.number})"
    return f"failed, kept (--retry-failed runs it again): {trial.user_attrs.get('fail_reason', '?')}"


def simulate_starts(order: list, waits_for, limit: int | None, workers: int) -> tuple[list, list]:
    """The trial loop's choice of trials (`TrialLoop.next_trial`), replayed on (row, seed) keys: which it starts,
    in order, and which second stages it holds back and leaves unstarted at the `--n-trials` limit. With
    several workers it assumes that trials end in the order they started."""
    queue, held, busy, started = list(order), [], [], []
    limit = len(order) if limit is None else limit

    def ready(key) -> bool:
        return waits_for(key) not in set(busy) | {h for h in held if h != key} | set(queue)

    def next_key():
        for key in held:
            if ready(key):
                held.remove(key)
                return key
        while queue:
            key = queue.pop(0)
            if ready(key):
                return key
            held.append(key)
        return None

    while True:
        while len(busy) < workers and len(started) < limit and (key := next_key()) is not None:
            started.append(key)
            busy.append(key)
        if not busy:
            return started, held
        busy.pop(0)


def plan_rows(checked: CheckedStudy, trials: list, smoke: bool, retry_failed: bool, limit: int | None,
              live: bool):
    """One line per (row, seed) in YAML order, and how many trials would run now."""
    from optuna.trial import TrialState

    spec = checked.spec
    rows = {r["id"]: r for r in spec.rows}

    def waits_for(key):
        target = first_stage_row(spec, rows[key[0]])
        return None if target is None else (target, key[1])

    queued, new = rows_left(spec, trials, retry_failed, checked.skipped)
    order = queued + new
    started, held = simulate_starts(order, waits_for, limit, len(checked.devices or [None]))
    lines = []
    for row in spec.rows:
        for seed in spec.replicates():
            key, label = (row["id"], seed), row["id"] + (f" seed {seed}" if seed is not None else "")
            mine = [t for t in trials if row_key(t) == key]
            done = next((t for t in reversed(mine) if t.state == TrialState.COMPLETE), None)
            if row["id"] in checked.skipped:
                lines.append((label, f"skipped: {checked.skipped[row['id']]}", "–"))
                continue
            if key in started:
                plan = "queued" if mine and mine[-1].state == TrialState.WAITING else (
                    why_again(mine[-1], live) if mine else "runs")
            elif key in held:
                plan = (f"not started: waits for its first stage row {waits_for(key)[0]!r} until --n-trials {limit} "
                        "is reached; runs next time")
            elif key in order:
                plan = f"waits: beyond --n-trials {limit}"
            else:
                plan = outcome_text(spec, smoke, done or mine[-1])
            lines.append((label, plan, settings(checked.configs[row["id"]])))
    return lines, len(started)


def plan_search(checked: CheckedStudy, trials: list, smoke: bool, retry_failed: bool, limit: int | None,
                live: bool):
    """One line per trial on record, one for what the sampler would add, and how many trials would run now."""
    from optuna.trial import TrialState

    spec = checked.spec
    retry, n = search_left(spec, trials, retry_failed, limit)

    def what(t) -> str:  # what happened; the "next" line says what a run would retry
        if t.state == TrialState.RUNNING:
            return "running now, in that process" if live else "left RUNNING by a process that ended"
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted"):
            return "interrupted"
        if t.state == TrialState.FAIL:
            return f"failed: {t.user_attrs.get('fail_reason', '?')}"
        return outcome_text(spec, smoke, t) if t.state == TrialState.COMPLETE else t.state.name.lower()

    lines = [(f"trial {t.number}", what(t), ", ".join(f"{k}={v}" for k, v in t.params.items())) for t in trials]
    space = ", ".join(f"{k} in {d['choices'] if d['type'] == 'categorical' else [d['low'], d['high']]}"
                      for k, d in spec.space.items())
    retried = f"{len(retry)} interrupted or failed point(s) again, then " if retry else ""
    lines.append(("next", f"{n} trial(s): {retried}{spec.sampler} sampler (seed {spec.seed}) over {space}",
                  "base: " + settings(checked.configs["base"])))
    return lines, n


def plan_study(name_or_path: str, *, smoke: bool = False, storage: str | None = None,
               tracking_uri: str | None = None, n_trials: int | None = None, retry_failed: bool = False,
               seeds: list[int] | None = None, devices: list[str] | None = None, report: bool = True,
               out_dir: str | None = None) -> StudyPlan:
    """What `run_study` with these options would do now, after the same checks; creates nothing (no store, no
    study, no lock, no run)."""
    if report and out_dir is not None:
        check_report_folder(out_dir)
    checked = check_everything(name_or_path, smoke, storage, tracking_uri, n_trials, seeds, devices, retry_failed)
    spec = checked.spec
    study_name = spec.experiment(smoke)
    trials = checked.recorded.get_trials(deepcopy=False) if checked.recorded is not None else []
    if smoke and spec.space and n_trials is None:
        n_trials = SMOKE_SEARCH_TRIALS
    holder = lock_holder(study_name, checked.storage_url)
    make = plan_rows if spec.rows else plan_search
    lines, to_run = make(checked, trials, smoke, retry_failed, n_trials, live=holder is not None)
    waiting_rows = any(first_stage_row(spec, r) for r in spec.rows)
    assumption = ("trials end in the order they start (with several workers, which second stage can start "
                  "before --n-trials is reached depends on that)" if waiting_rows and n_trials is not None
                  and len(checked.devices or []) > 1 else None)
    return StudyPlan(spec.name, study_name, checked.storage_url, checked.tracking_uri, len(trials), to_run, lines,
                     holder, assumption)


def print_plan(plan: StudyPlan) -> None:
    print(f"study {plan.name}: dry run, nothing created. {plan.to_run} trial(s) would run now.")
    print(f"  Optuna {plan.storage}, study {plan.optuna_study!r}: "
          + (f"{plan.on_record} trial(s) on record" if plan.on_record else "new"))
    print(f"  MLflow {plan.tracking_uri}, experiment {plan.optuna_study!r}")
    if plan.running_elsewhere:
        print(f"  being run now by {plan.running_elsewhere}: a run of this command would be refused until it ends")
    if plan.assumption:
        print(f"  assuming {plan.assumption}")
    width = max(len(label) for label, _, _ in plan.lines)
    wide = max(len(how) for _, _, how in plan.lines)
    for label, what, how in plan.lines:
        print(f"  {label:<{width}}  {how:<{wide}}  {what}")


def objective_labels(spec: StudySpec, smoke: bool) -> list[str]:
    """The objective metrics as computed: a smoke run reports e.g. the teacher gap in place of FID."""
    from sfd.runner import objective_key

    return [objective_key(m, smoke) for m in spec.metrics]


def print_summary(spec: StudySpec, study, smoke: bool = False) -> None:
    """One line per row (table studies) or per completed trial (search), from the Optuna study."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    head = (f"{'row / trial':<40} {'state':<9} " + " ".join(f"{m:>18}" for m in objective_labels(spec, smoke))
            + f" {'train s':>9}")
    print(head)
    print("-" * len(head))

    def line(label, t):
        values = t.values or [math.nan] * len(spec.metrics)
        state = t.state.name if t is not None else "NOT RUN"
        train = t.user_attrs.get("train/wall_s") if t is not None else None
        print(f"{label:<40} {state:<9} " + " ".join(f"{v:>18.5g}" for v in values)
              + f" {train if train is not None else math.nan:>9.1f}")

    if spec.rows:
        for row in spec.rows:
            for seed in spec.replicates():
                label = row["id"] + (f" seed {seed}" if seed is not None else "")
                mine = [t for t in trials if t.user_attrs.get("row") == row["id"] and t.user_attrs.get("seed") == seed]
                best = next((t for t in reversed(mine) if t.state == TrialState.COMPLETE), mine[-1] if mine else None)
                if best is None:
                    print(f"{label:<40} {'NOT RUN':<9}")
                else:
                    line(label, best)
    else:
        for t in trials:
            if t.state == TrialState.COMPLETE:
                shown = ",".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in t.params.values())
                line(f"trial {t.number} {shown}", t)


def check_report_folder(out_dir) -> None:
    """`--out` must be a folder that can be made, before the trials run rather than after."""
    try:
        from reports.build import ReportError, check_out_dir
    except ImportError:  # no report will be built either (see build_report)
        return
    try:
        check_out_dir(out_dir)
    except ReportError as exc:
        raise StudyError(f"--out: {exc}") from None


def build_report(name: str, storage: str, tracking_uri: str, out_dir, smoke: bool, say) -> Path | None:
    try:
        from reports.build import build_report as build
    except ImportError as exc:
        say(f"note: no report built (reports.build is not importable: {exc})")
        return None
    accepted = inspect.signature(build).parameters
    kwargs = {"storage": storage, "tracking_uri": tracking_uri, "out_dir": out_dir, "smoke": smoke}
    path = build(name, **{k: v for k, v in kwargs.items() if k in accepted})
    say(f"report: {path}")
    return path


# ----- CLI -------------------------------------------------------------------------------------------------

def list_studies() -> None:
    for path in available_studies():
        try:
            spec = load_spec(str(path))
            size = f"{len(spec.rows)} rows" if spec.rows else f"{spec.n_trials} trials ({spec.sampler})"
            first = spec.description.split(". ")[0].rstrip(".")
            print(f"{spec.name:<24} {spec.kind:<10} {size:<18} {'/'.join(spec.metrics):<28} {first}")
        except StudyError as exc:
            print(f"{path.stem:<24} INVALID    {exc}")


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
    p.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                   help="run trials side by side, one worker process per entry (cpu or cuda:<index>; repeat an "
                   "entry to share it), e.g. --devices cuda:0 cuda:1, or all (every CUDA device); default: one "
                   "trial at a time in this process, on each config's device")
    p.add_argument("--dry-run", action="store_true", help="check the study and print what a run would do now "
                   "(each row's settings and whether it runs, is done or stays failed); create nothing")
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
    from sfd.assets import AssetError
    from sfd.config import ConfigError

    try:
        if args.dry_run:
            print_plan(plan_study(args.study, smoke=args.smoke, storage=args.storage, tracking_uri=args.tracking_uri,
                                  n_trials=args.n_trials, retry_failed=args.retry_failed, seeds=args.seeds,
                                  devices=args.devices, report=not args.no_report, out_dir=args.out))
            return 0
        outcome = run_study(args.study, smoke=args.smoke, storage=args.storage, tracking_uri=args.tracking_uri,
                            n_trials=args.n_trials, retry_failed=args.retry_failed, report=not args.no_report,
                            out_dir=args.out, seeds=args.seeds, devices=args.devices)
    except (StudyError, ConfigError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if outcome.failed:
        print(f"{len(outcome.failed)} trial(s) failed: " + "; ".join(f"#{n}: {r}" for n, r in outcome.failed),
              file=sys.stderr)
        return 1
    return 3 if outcome.report_error else 0


if __name__ == "__main__":
    from sfd.signals import run_script

    sys.exit(run_script(main))  # SIGTERM stops it the way Ctrl-C does: open runs end KILLED
