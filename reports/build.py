"""Rebuild the paper's tables from tracked runs: Optuna study + MLflow runs -> pandas -> report.

    python reports/build.py <study> [--out DIR] [--storage URL] [--tracking-uri URI] [--smoke]

writes into ``reports/out/<study>/`` (git-ignored):

* ``report.md``    header (teacher, device, samples, budgets, commit, metric), the study's table in the
                   paper's layout (ablation / comparison) or the best trials + parameter importances (search),
                   figures, and an auto-written reading of the results;
* ``figures/``     PNG + SVG: metric vs NFE, metric vs training device-hours (Pareto), loss curves per student
                   step, ours-vs-paper bars (ablation), importances + history (search), sample grids;
* ``report.ipynb`` generated with nbformat, executed headless with nbclient; its cells load the data again
                   from MLflow/Optuna through the functions below; ``report.html`` is its nbconvert export;

and logs all of it under ``report/`` on the study's parent MLflow run.

Numbers come only from tracked runs; the "paper" columns come only from ``reports/paper_numbers.yaml``.
Rows that were not run, failed, or are still running are shown as such and never filled in. Smoke runs
(tag ``sfd.smoke=true``) are left out unless ``smoke=True``.
"""
from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse
import contextlib
import datetime as _dt
import difflib
import io
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from sfd import tracking as sfd_tracking

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER_NUMBERS_PATH = Path(__file__).resolve().with_name("paper_numbers.yaml")
DEFAULT_OUT_ROOT = REPO_ROOT / "reports" / "out"

# Evaluation metrics a run can log (see the contract); the first one a study names is the report's metric.
QUALITY_METRICS = ("fid", "fd_digits", "pixel_fd", "class_accuracy", "teacher_gap_mean", "teacher_gap_std")
HIGHER_IS_BETTER = {"class_accuracy"}
METRIC_DESCRIPTIONS = {
    "fid": "FID (Inception-v3 Fréchet distance), the paper's metric",
    "fd_digits": "fd_digits: Fréchet distance in the feature space of the embedded digits classifier — NOT FID",
    "pixel_fd": "pixel_fd: Fréchet distance on raw pixels — NOT FID",
    "class_accuracy": "class_accuracy: fraction of samples the digits classifier assigns the intended class — NOT FID",
    "teacher_gap_mean": "teacher_gap_mean: per-sample RMSE to the teacher's own samples from the same noise — NOT FID",
    "teacher_gap_std": "teacher_gap_std: spread of the per-sample RMSE to the teacher — NOT FID",
    "objective": "objective: the study's objective value",
}
# The ablation table's label columns (the factors the paper varies).
FACTORS = ("method", "teacher", "t_min", "afs", "loss", "nfe", "guidance")
GROUP_ORDER = ("solver", "distillation", "sfd", "sfd-v", "second-stage")
ALGORITHM_GROUP = {"sfd": "sfd", "sfd-v": "sfd-v", "sfdv": "sfd-v", "second-stage": "second-stage",
                   "second_stage": "second-stage", "vanilla": "distillation", "baseline": "solver",
                   "solver": "solver", "none": "solver"}
SOLVER_DISPLAY = {"euler": "DDIM", "heun": "Heun", "dpm2": "DPM(2S)", "ipndm": "iPNDM", "dpmpp3m": "DPM++(3M)"}
LOSS_DISPLAY = {"l1": "L1", "l2": "L2", "pseudo_huber": "Pseudo-Huber", "lpips": "LPIPS"}
METHOD_DISPLAY = {"sfd": "SFD", "vanilla": "Vanilla", "sfd-v": "SFD-v", "second-stage": "SFD second stage"}
# Synonyms folded together when a row has no paper_key and is matched by its labels.
_CANON_ALIASES = {"dpm2": "dpm2s", "dpmsolver2": "dpm2s", "ddim": "euler", "dpmsolverpp3m": "dpmpp3m",
                  "secondstage": "sfdsecondstage", "sfd2ndstage": "sfdsecondstage", "pseudohuber": "pseudohuber",
                  "amed": "amedplugin", "baseline": "solver"}


class ReportError(RuntimeError):
    """A report cannot be built (no such study, no runs); the message says what was looked for and where."""


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------

def _canon(value: Any) -> str:
    """Normalise a label for matching: 'DPM++(3M)' == 'dpmpp3m', 'DPM(2S)' == 'dpm2', 'L1' == 'l1'."""
    if value is None:
        return ""
    s = str(value).lower().replace("++", "pp")
    s = re.sub(r"[^a-z0-9.]", "", s)
    return _CANON_ALIASES.get(s, s)


def _to_bool(value: Any) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("true", "yes", "1", "on"):
        return True
    if s in ("false", "no", "0", "off"):
        return False
    if s in ("", "none", "null", "-", "–"):
        return None
    return None


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _to_int(value: Any) -> int | None:
    f = _to_float(value)
    return None if f is None else int(round(f))


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(float(value))


def fmt_value(value: Any) -> str:
    """How a measured number is written in the tables (tests format expected values with this too)."""
    if not _is_num(value):
        return "—"
    v = float(value)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return str(int(v)) if v.is_integer() else f"{v:.1f}"
    return f"{v:.4g}"


def fmt_paper(value: Any) -> str:
    """The paper's numbers as the paper prints them (two decimals)."""
    return "—" if not _is_num(value) else f"{float(value):.2f}"


def fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.2g}"


def fmt_delta(value: Any) -> str:
    return "—" if not _is_num(value) else ("+" if value > 0 else "") + fmt_value(value)


def fmt_hours(value: Any) -> str:
    if not _is_num(value):
        return "—"
    v = float(value)
    if v == 0:
        return "0"
    return f"{v:.3g}" if v >= 0.01 else f"{v:.2e}"


def fmt_afs(value: Any) -> str:
    b = _to_bool(value)
    return "–" if b is None else ("yes" if b else "no")


def fmt_tmin(value: Any) -> str:
    f = _to_float(value)
    return "—" if f is None else f"{f:g}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)).strip("_") or "row"


def _lower_is_better(metric: str) -> bool:
    return metric not in HIGHER_IS_BETTER


def teacher_dataset(teacher_name: str | None) -> str | None:
    """'cifar10-uncond' -> 'cifar10', 'imagenet64-cond' -> 'imagenet64', 'digits-cond' -> 'digits'."""
    if not teacher_name:
        return None
    name = str(teacher_name).lower()
    for ds in ("cifar10", "imagenet64", "ffhq64", "afhqv2-64", "digits", "gmm"):
        if name.startswith(ds):
            return ds
    return name


@contextlib.contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar per artifact download; a report downloads one per row."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------------
# Paper numbers, study spec, stores
# ----------------------------------------------------------------------------------------------------------

def load_paper_numbers(path: str | Path | None = None) -> dict:
    """The paper's published numbers (reports/paper_numbers.yaml) with an index by key."""
    with open(path or PAPER_NUMBERS_PATH) as f:
        paper = yaml.safe_load(f)
    index: dict[str, dict] = {}
    for row in paper["ablation"]["rows"]:
        index[row["key"]] = {**row, "table": "ablation", "dataset": paper["ablation"]["dataset"],
                             "nfe": row.get("nfe", paper["ablation"].get("nfe"))}
    for dataset, rows in paper["comparison"].items():
        for row in rows:
            index[row["key"]] = {**row, "table": "comparison", "dataset": dataset}
    paper["index"] = index
    return paper


def paper_comparison_frame(paper: dict, dataset: str) -> pd.DataFrame:
    rows = paper["comparison"].get(dataset, [])
    df = pd.DataFrame(rows)
    for col in ("hours", "hours_text"):
        if col not in df:
            df[col] = None
    return df


def load_study_spec(study_name: str, spec: str | Path | dict | None = None) -> tuple[dict, str | None]:
    """The study YAML: an explicit dict or path, else ``studies/<name>.yaml``; ({}, None) when absent."""
    if isinstance(spec, dict):
        return dict(spec), None
    path = Path(spec) if spec else REPO_ROOT / "studies" / f"{study_name}.yaml"
    if not path.exists():
        if spec:
            raise ReportError(f"study YAML {path} does not exist")
        return {}, None
    with open(path) as f:
        return (yaml.safe_load(f) or {}), str(path)


def _sqlite_file(uri: str | None) -> Path | None:
    """The file behind a sqlite URL (``sqlite:///relative`` or ``sqlite:////absolute``), else None."""
    if not uri or not str(uri).startswith("sqlite:///"):
        return None
    rest = str(uri)[len("sqlite:///"):].split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(rest)


def _storage_file(url: str) -> Path | None:
    """The local file behind an Optuna storage URL (sqlite, or a journal file as `open_optuna_storage` reads
    it), else None (a database server)."""
    s = str(url)
    if s.startswith("sqlite:"):
        return _sqlite_file(s)
    if "://" in s and not s.startswith("file://"):
        return None
    return Path(re.sub(r"^(journal:|file://)", "", s))


def check_storage(url: str, given: bool) -> None:
    """A storage file that is not there is an error: opening it would create an empty one, and a report
    without the trials would be logged over the parent run's. `given`: the URL came from --storage (else from
    the parent run's optuna.storage tag)."""
    path = _storage_file(url)
    if path is not None and not path.is_file():
        where, fix = (("--storage", "leave --storage out to use the one the study ran with") if given else
                      ("the study's optuna.storage tag", "pass --storage with where that file is now"))
        raise ReportError(f"no Optuna storage at {path} ({where} {url}); {fix}")


def _study_names() -> list[str]:
    return sorted(p.stem for p in (REPO_ROOT / "studies").glob("*.yaml"))


def run_hint(study_name: str, smoke: bool, known=()) -> str:
    """How to get runs for `study_name`: the studies/run.py command when the study exists (a
    `<study>-seeds-0-1` name: its `--seeds` command), else the close study / experiment names."""
    m = re.fullmatch(r"(.+)-seeds-(\d+(?:-\d+)*)", study_name)
    base, seeds = (m.group(1), " --seeds " + m.group(2).replace("-", " ")) if m else (study_name, "")
    names = _study_names()
    if base in names:
        return f"run `python studies/run.py {base}{seeds}{' --smoke' if smoke else ''}` first"
    close = difflib.get_close_matches(study_name, sorted(set(names) | set(known)), n=3)
    return (f"there is no study {study_name!r} in studies/ "
            + (f"(did you mean {', '.join(close)}?)" if close else f"(studies: {', '.join(names)})"))


def open_optuna_storage(url: str):
    """An RDB URL is passed through; a journal file (a path, or a ``journal:`` / ``file://`` prefix) is opened."""
    s = str(url)
    if "://" in s and not s.startswith("file://"):
        return s
    path = re.sub(r"^(journal:|file://)", "", s)
    from optuna.storages import JournalStorage
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # older optuna
        from optuna.storages import JournalFileStorage as JournalFileBackend  # type: ignore
    return JournalStorage(JournalFileBackend(path))


# ----------------------------------------------------------------------------------------------------------
# Loading: Optuna + MLflow -> StudyData
# ----------------------------------------------------------------------------------------------------------

@dataclass
class StudyData:
    study: str
    kind: str
    smoke: bool
    spec: dict
    spec_path: str | None
    tracking_uri: str
    storage: str | None
    experiment_name: str
    experiment_id: str
    parent: dict
    runs: pd.DataFrame            # every child run of the parent with the requested smoke flag, flattened
    trials: pd.DataFrame          # Optuna trials (empty when the Optuna study could not be loaded)
    rows: pd.DataFrame            # one line per table row (table studies) or per trial (search studies)
    metric: str
    objective_metrics: list[str]
    directions: list[str]
    paper: dict
    paper_dataset: str
    comparable: bool              # our metric is the paper's FID on the paper's dataset: Δ is meaningful
    histories: dict[str, pd.DataFrame] = field(default_factory=dict)   # run_id -> step, key, value
    samples: dict[str, Path] = field(default_factory=dict)             # run_id -> local samples.png
    optuna_study: Any = None
    notes: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)


def _search_all(client, experiment_ids, filter_string):
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _flatten_run(run) -> dict:
    info, d = run.info, run.data
    return {"run_id": info.run_id, "run_name": info.run_name, "status": info.status,
            "start_time": info.start_time, "end_time": info.end_time,
            "tags": dict(d.tags), "params": dict(d.params), "metrics": dict(d.metrics)}


def _primary_metric(spec: dict, runs: list[dict], kind: str) -> tuple[str, list[str], list[str]]:
    obj = spec.get("objective") or {}
    names = obj.get("metric", obj.get("metrics", []))
    names = [names] if isinstance(names, str) else list(names or [])
    names = ["teacher_gap_mean" if n == "teacher_gap" else n for n in names]
    dirs = obj.get("direction", obj.get("directions", []))
    dirs = [dirs] if isinstance(dirs, str) else list(dirs or [])
    for n in names:
        if n in QUALITY_METRICS:
            return n, names, dirs
    logged = set().union(*[r["metrics"].keys() for r in runs]) if runs else set()
    for n in ("fid", "fd_digits", "teacher_gap_mean", "pixel_fd", "class_accuracy"):
        if n in logged:
            return n, names, dirs
    return (names[0] if names else "objective"), names, dirs


def _row_labels(row: dict, params: dict) -> dict:
    """Table labels of a row: explicit fields of the study row, else its params, else the run's params."""
    rp = {**params, **(row.get("params") or {})}

    def pick(field_, *keys):
        if row.get(field_) is not None:
            return row[field_]
        for k in keys:
            if rp.get(k) not in (None, "", "None"):
                return rp[k]
        return None

    method = pick("method", "algorithm")
    if method is not None and row.get("method") is None:
        method = METHOD_DISPLAY.get(str(method).lower(), method)
    teacher = pick("teacher", "solver.name", "teacher.solver")
    if teacher is not None and row.get("teacher") is None:
        teacher = SOLVER_DISPLAY.get(str(teacher).lower(), teacher)
    loss = pick("loss", "loss.name")
    if loss is not None and row.get("loss") is None:
        loss = LOSS_DISPLAY.get(str(loss).lower(), loss)
    afs = row["afs"] if "afs" in row else pick("afs", "student.afs")
    group = row.get("group")
    if group is None:
        algo = str(rp.get("algorithm", "")).lower()
        group = ALGORITHM_GROUP.get(algo) if algo else None
    return {"method": method, "teacher": teacher, "t_min": _to_float(pick("t_min", "student.t_min")),
            "afs": _to_bool(afs), "loss": loss, "nfe": _to_int(pick("nfe", "student.nfe", "nfe")), "group": group,
            "guidance": _to_float(pick("guidance", "student.guidance"))}


def _choose_run(candidates: list[dict], metric: str) -> dict | None:
    """Several attempts for one row (retries after a crash): the latest finished one, else the latest other."""
    if not candidates:
        return None
    finished = [r for r in candidates if r["status"] == "FINISHED"]
    pool = finished or candidates
    return max(pool, key=lambda r: (r["end_time"] or 0, r["start_time"] or 0))


def _replicate_run(candidates: list[dict], metric: str, seeds: list[int]) -> dict | None:
    """A row run once per seed: the chosen run of each seed merged into one run whose metrics are the means
    over the seeds that finished; `replicates` keeps each seed's run id and value for the ± and the links."""
    per_seed = [_choose_run([c for c in candidates if _to_int(c["params"].get("seed")) == s], metric) for s in seeds]
    chosen = [r for r in per_seed if r is not None]
    ok = [r for r in chosen if r["status"] == "FINISHED"]
    if not ok:
        return _choose_run(chosen, metric)  # nothing finished: the row shows its latest failure
    shared = set.intersection(*(set(r["metrics"]) for r in ok))
    means = {k: statistics.fmean(float(r["metrics"][k]) for r in ok) for k in shared}
    return {**ok[0], "metrics": means, "replicates": {
        "seeds": [_to_int(r["params"].get("seed")) for r in ok], "run_ids": [r["run_id"] for r in ok],
        "values": [_to_float(r["metrics"].get(metric)) for r in ok], "expected": len(seeds),
        "metrics": [r["metrics"] for r in ok]}}


def _status_of(run: dict | None, trial: dict | None, metric: str) -> tuple[str, str | None]:
    if run is None:
        if trial is not None and trial.get("state") == "FAIL":
            return "failed", trial.get("fail_reason") or "trial failed before its MLflow run was created"
        if trial is not None and trial.get("state") == "RUNNING":
            return "running", None
        return "not run", None
    if run["status"] == "FAILED":
        return "failed", run["tags"].get("sfd.error") or (trial or {}).get("fail_reason") or "run FAILED (no sfd.error tag)"
    if run["status"] in ("RUNNING", "SCHEDULED"):
        if trial is not None and trial.get("state") == "RUNNING":
            return "running", "or interrupted: re-running the study resumes it"
        return "failed", "interrupted: run never finished"
    if run["status"] == "KILLED":
        return "failed", run["tags"].get("sfd.error") or "run KILLED"
    if _to_float(run["metrics"].get(metric)) is None:
        return "failed", f"metric {metric!r} not logged"
    return "ok", None


def load_study_data(study_name: str, *, storage: str | None = None, tracking_uri: str | None = None,
                    smoke: bool = False, spec: str | Path | dict | None = None,
                    artifact_dir: str | Path | None = None, paper_numbers: str | Path | None = None) -> StudyData:
    """Read the study from Optuna and its runs from MLflow into pandas (see the module docstring)."""
    from mlflow.tracking import MlflowClient

    spec_dict, spec_path = load_study_spec(study_name, spec)
    if storage:
        check_storage(storage, given=True)
    tracking_uri = tracking_uri or sfd_tracking.default_tracking_uri()
    db = _sqlite_file(tracking_uri)
    if db is not None and not db.is_file():  # MlflowClient would create an empty store there
        raise ReportError(f"no MLflow store at {db} (tracking URI {tracking_uri}); {run_hint(study_name, smoke)}; "
                          "or pass --tracking-uri / set MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_name = f"{study_name}-smoke" if smoke else study_name
    exp = client.get_experiment_by_name(exp_name)
    if exp is None:
        known = {e.name.removesuffix("-smoke") for e in client.search_experiments()}
        raise ReportError(f"no MLflow experiment {exp_name!r} at {tracking_uri}; "
                          f"{run_hint(study_name, smoke, known)}; or pass --tracking-uri")
    notes: list[str] = []
    parents = [_flatten_run(r) for r in _search_all(
        client, [exp.experiment_id], f"tags.`sfd.role` = 'study' and tags.`sfd.study` = '{study_name}'")]
    if not parents:
        raise ReportError(f"experiment {exp_name!r} at {tracking_uri} has no parent run tagged "
                          f"sfd.role=study, sfd.study={study_name}")
    if len(parents) > 1:
        notes.append(f"{len(parents)} parent runs found for this study; using the latest ({parents[-1]['run_id']}).")
    parent = parents[-1]
    if not spec_dict and spec is None:
        spec_dict, spec_path = _spec_from_parent(client, parent, art_hint=artifact_dir)
        if spec_path:
            notes.append(f"study YAML read from the parent run ({spec_path}).")
    want_smoke = "true" if smoke else "false"
    children_all = [_flatten_run(r) for r in _search_all(
        client, [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent['run_id']}'")]
    children = [c for c in children_all if c["tags"].get("sfd.role", "trial") == "trial"
                and str(c["tags"].get("sfd.smoke", "false")).lower() == want_smoke]
    skipped = len(children_all) - len(children)
    if skipped:
        notes.append(f"{skipped} child run(s) with sfd.smoke != {want_smoke} left out.")

    kind = spec_dict.get("kind") or parent["tags"].get("sfd.kind") or (
        "ablation" if any("sfd.row" in c["tags"] for c in children) else "search")
    metric, objective_metrics, directions = _primary_metric(spec_dict, children, kind)
    finished = [c for c in children if c["status"] == "FINISHED"]
    if finished and not any(metric in c["metrics"] for c in finished):
        logged = [m for m in QUALITY_METRICS if any(m in c["metrics"] for c in finished)]
        if logged:
            why = _uniq(c["tags"].get(f"sfd.smoke.metric.{metric}") for c in finished)
            notes.append(f"the study's metric `{metric}` was not logged by its runs"
                         + (f" ({'; '.join(why)})" if why else "") + f"; the tables show `{logged[0]}` instead.")
            metric = logged[0]

    # --- Optuna ---
    storage_url = storage or parent["tags"].get("optuna.storage") or sfd_tracking.default_optuna_storage()
    if not storage:
        check_storage(storage_url, given=False)
    optuna_name = parent["tags"].get("optuna.study_name") or study_name
    trials: list[dict] = []
    optuna_study = None
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna_study = optuna.load_study(study_name=optuna_name, storage=open_optuna_storage(storage_url))
        for t in optuna_study.get_trials(deepcopy=False):
            sys_attrs = getattr(t, "system_attrs", {}) or {}
            trials.append({"number": t.number, "state": t.state.name, "values": t.values,
                           "params": dict(t.params), "user_attrs": dict(t.user_attrs),
                           "fail_reason": t.user_attrs.get("fail_reason") or sys_attrs.get("fail_reason"),
                           "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                           "row": t.user_attrs.get("sfd.row") or t.user_attrs.get("row")
                           or t.user_attrs.get("row_id"),
                           "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete})
    except Exception as exc:  # the MLflow side alone still gives the tables
        notes.append(f"Optuna study {optuna_name!r} could not be loaded from {storage_url}: {exc}")
    trials_df = pd.DataFrame(trials, columns=["number", "state", "values", "params", "user_attrs", "fail_reason",
                                              "mlflow_run_id", "row", "datetime_start", "datetime_complete"],
                             dtype=object)
    trial_by_run = {t["mlflow_run_id"]: t for t in trials if t["mlflow_run_id"]}
    for c in children:
        t = trial_by_run.get(c["run_id"])
        c["trial_number"] = t["number"] if t else _to_int(c["tags"].get("sfd.trial_number"))
    trial_by_number = {t["number"]: t for t in trials}

    # --- paper ---
    paper = load_paper_numbers(paper_numbers)
    teachers = sorted({c["params"].get("teacher.name") for c in children if c["params"].get("teacher.name")})
    our_dataset = teacher_dataset(teachers[0]) if teachers else None
    spec_rows = list(spec_dict.get("rows") or [])
    keyed = [paper["index"][r["paper_key"]] for r in spec_rows if r.get("paper_key") in paper["index"]]
    if keyed:
        paper_dataset = keyed[0]["dataset"]
    else:
        paper_dataset = "imagenet64" if our_dataset == "imagenet64" else "cifar10"
    comparable = (metric == "fid" and not smoke and our_dataset == paper_dataset)

    # --- rows ---
    lines: list[dict] = []
    if spec_rows:
        by_row: dict[str, list[dict]] = {}
        for c in children:
            by_row.setdefault(c["tags"].get("sfd.row"), []).append(c)
        trials_by_row: dict[str, list[dict]] = {}
        for t in trials:
            rid = t["row"]
            if rid is None and t["mlflow_run_id"]:
                run = next((c for c in children_all if c["run_id"] == t["mlflow_run_id"]), None)
                rid = run["tags"].get("sfd.row") if run else None
            if rid is not None:
                trials_by_row.setdefault(rid, []).append(t)
        skipped_rows = {str(k): str(v) for k, v in (spec_dict.get("skip_rows") or {}).items()}
        skipped_rows.update(_skipped_rows(parent, {str(r.get("id")) for r in spec_rows}))
        seeds = spec_dict.get("seeds") or None
        for order, srow in enumerate(spec_rows):
            rid = str(srow.get("id", order))
            cands = by_row.get(rid, [])
            run = _replicate_run(cands, metric, seeds) if seeds else _choose_run(cands, metric)
            trial = trial_by_run.get(run["run_id"]) if run else None
            if trial is None:
                ts = trials_by_row.get(rid, [])
                if run is not None:
                    ts = [t for t in ts if t["number"] == run.get("trial_number")] or ts
                trial = ts[-1] if ts else None
            line = _make_line(order, rid, srow, run, trial, metric, len(cands), paper, paper_dataset, kind)
            if line["status"] == "failed" and any(t["state"] == "WAITING" for t in trials_by_row.get(rid, [])):
                line["reason"] = f"{line['reason']} (queued again)"
            if line["status"] == "not run" and rid in skipped_rows:
                line["reason"] = f"skipped: {skipped_rows[rid]}"
            lines.append(line)
            lines.extend(_per_nfe_lines(line, run, metric, paper, paper_dataset, kind))
        known = {str(r.get("id", i)) for i, r in enumerate(spec_rows)}
        extra = [c for c in children if c["tags"].get("sfd.row") not in known]
        if extra:
            notes.append(f"{len(extra)} run(s) whose sfd.row is not in the study YAML are listed under 'Other runs'.")
    else:
        # search studies (or table studies whose YAML is missing): one line per trial / run
        if kind != "search" and not spec_dict:
            notes.append("study YAML not found: rows are the tracked runs in trial order, not the paper's order.")
        seen = set()
        order = 0
        for t in sorted(trials, key=lambda t: t["number"]):
            run = next((c for c in children if c["run_id"] == t["mlflow_run_id"]), None)
            if run is None and t["mlflow_run_id"]:
                continue  # that trial's run is a smoke run or belongs elsewhere
            if run is not None:
                seen.add(run["run_id"])
            rid = (run["tags"].get("sfd.row") if run else None) or f"trial-{t['number']}"
            lines.append(_make_line(order, rid, {}, run, t, metric, 1, paper, paper_dataset, kind))
            order += 1
        for c in children:
            if c["run_id"] not in seen:
                rid = c["tags"].get("sfd.row") or f"trial-{c.get('trial_number')}"
                lines.append(_make_line(order, rid, {}, c, trial_by_number.get(c.get("trial_number")), metric, 1,
                                        paper, paper_dataset, kind))
                order += 1
    rows_df = pd.DataFrame(lines, dtype=object)  # object: None stays None (pandas 3 would make it NaN)

    runs_df = pd.DataFrame([{
        "run_id": c["run_id"], "row": c["tags"].get("sfd.row"), "trial": c.get("trial_number"),
        "status": c["status"], "error": c["tags"].get("sfd.error"), "start_time": c["start_time"],
        "end_time": c["end_time"], "tags": c["tags"], "params": c["params"], "metrics": c["metrics"]}
        for c in children], columns=["run_id", "row", "trial", "status", "error", "start_time", "end_time",
                                      "tags", "params", "metrics"], dtype=object)

    data = StudyData(study=study_name, kind=kind, smoke=smoke, spec=spec_dict, spec_path=spec_path,
                     tracking_uri=tracking_uri, storage=storage_url, experiment_name=exp_name,
                     experiment_id=exp.experiment_id, parent=parent, runs=runs_df, trials=trials_df,
                     rows=rows_df, metric=metric, objective_metrics=objective_metrics, directions=directions,
                     paper=paper, paper_dataset=paper_dataset, comparable=comparable,
                     optuna_study=optuna_study, notes=notes)

    # --- loss histories and sample grids of the runs shown in the table ---
    shown = [r for r in rows_df.to_dict("records") if r.get("run_id") and not r.get("derived_from")] \
        if len(rows_df) else []
    art_dir = Path(artifact_dir) if artifact_dir else Path(tempfile.mkdtemp(prefix="sfd-report-"))
    for r in shown:
        run = next(c for c in children if c["run_id"] == r["run_id"])
        keys = sorted((k for k in run["metrics"] if re.fullmatch(r"loss/step_\d+", k)),
                      key=lambda k: int(k.rsplit("_", 1)[1]))
        if not keys and "loss" in run["metrics"]:
            keys = ["loss"]  # e.g. vanilla rows train one random step per iteration: only the mean loss
        hist = []
        for k in keys:
            label = int(k.rsplit("_", 1)[1]) if k != "loss" else "mean"
            for m in client.get_metric_history(run["run_id"], k):
                hist.append({"key": k, "student_step": label, "step": m.step, "value": m.value})
        if hist:
            data.histories[run["run_id"]] = pd.DataFrame(hist)
        try:
            names = {a.path for a in client.list_artifacts(run["run_id"])}
        except Exception:
            names = set()
        if "samples.png" in names:
            dst = art_dir / _slug(r["row_id"])
            dst.mkdir(parents=True, exist_ok=True)
            with _no_progress_bars():
                data.samples[run["run_id"]] = Path(client.download_artifacts(run["run_id"], "samples.png", str(dst)))
    return data


def _spec_from_parent(client, parent: dict, art_hint=None) -> tuple[dict, str | None]:
    """The study YAML the runner recorded: tag ``sfd.spec_path`` if that file exists, else a YAML artifact
    logged on the parent run."""
    path = parent["tags"].get("sfd.spec_path")
    if path and Path(path).is_file():
        with open(path) as f:
            return (yaml.safe_load(f) or {}), path
    try:
        names = [a.path for a in client.list_artifacts(parent["run_id"]) if a.path.endswith((".yaml", ".yml"))]
    except Exception:
        names = []
    for name in names:
        dst = Path(tempfile.mkdtemp(prefix="sfd-spec-", dir=art_hint))
        with _no_progress_bars():
            local = client.download_artifacts(parent["run_id"], name, str(dst))
        with open(local) as f:
            data = yaml.safe_load(f) or {}
        if isinstance(data, dict) and ("rows" in data or "space" in data):
            return data, f"runs:/{parent['run_id']}/{name}"
    return {}, None


def _skipped_rows(parent: dict, row_ids: set[str]) -> dict[str, str]:
    """Rows the runner skipped for a missing asset (parent tag ``sfd.skipped_rows`` = 'id: reason; ...')."""
    out: dict[str, str] = {}
    text = parent["tags"].get("sfd.skipped_rows") or ""
    current = None
    for part in text.split("; "):
        rid, sep, reason = part.partition(": ")
        if sep and rid in row_ids:
            current = rid
            out[rid] = reason
        elif current is not None:  # a reason that itself contained '; '
            out[current] += "; " + part
    return out


def _make_line(order, rid, srow, run, trial, metric, attempts, paper, paper_dataset, kind) -> dict:
    params = run["params"] if run else {}
    labels = _row_labels(srow, params)
    status, reason = _status_of(run, trial, metric)
    metrics = run["metrics"] if run else {}
    value = _to_float(metrics.get(metric)) if status == "ok" else None
    prow = _paper_row(srow, labels, paper, paper_dataset, kind)
    if run and run["tags"].get("sfd.smoke.loss.name") and labels["loss"]:  # the smoke run swapped its loss
        trained = LOSS_DISPLAY.get(str(params.get("loss.name")).lower(), params.get("loss.name"))
        labels["loss"] = f"{labels['loss']} (smoke run trained {trained}: weights not installed)"
    # NFE as the run accounted it (guidance doubles it); the student's own NFE stays the ablation factor
    labels["student_nfe"] = labels["nfe"]
    if status == "ok" and _to_int(metrics.get("nfe")) is not None:
        labels["nfe"] = _to_int(metrics["nfe"])
    extra = {m: _to_float(metrics.get(m)) for m in QUALITY_METRICS
             if m != metric and status == "ok" and _to_float(metrics.get(m)) is not None}
    return {"order": order, "row_id": rid, **labels, "extra": extra, "derived_from": None,
            "paper_key": prow["key"] if prow else srow.get("paper_key"),
            "status": status, "reason": reason, "run_id": run["run_id"] if run else None,
            "run_status": run["status"] if run else None,
            "trial_number": (trial or {}).get("number", run.get("trial_number") if run else None),
            "trial_state": (trial or {}).get("state"), "attempts": attempts,
            "value": value, "objective": _to_float(metrics.get("objective")),
            "trial_values": (trial or {}).get("values"), "trial_params": (trial or {}).get("params") or {},
            "device_hours": _to_float(metrics.get("train/device_hours")) if status == "ok" else None,
            "train_wall_s": _to_float(metrics.get("train/wall_s")),
            "eval_samples": _to_int(metrics.get("eval/num_samples", params.get("eval.num_samples"))),
            "teacher_name": params.get("teacher.name"), "algorithm": params.get("algorithm"),
            "params": params,
            "paper_value": _to_float(prow.get("fid")) if prow else None,
            "paper_hours": _to_float(prow.get("hours")) if prow else None,
            "paper_hours_text": prow.get("hours_text") if prow else None,
            **_replicate_fields(run, status)}


def _replicate_fields(run: dict | None, status: str) -> dict:
    """n, sd and per-seed run ids of a replicated row (a study with `seeds:`); nothing for a single run."""
    rep = (run or {}).get("replicates")
    if not rep or status != "ok":
        return {}
    values = [v for v in rep["values"] if v is not None]
    return {"n_seeds": len(values), "seeds_expected": rep["expected"], "seed_run_ids": rep["run_ids"],
            "seeds": rep["seeds"], "value_sd": _sd(values),
            "extra_sd": {m: _seed_sd(rep["metrics"], m) for m in QUALITY_METRICS}}


def _sd(values: list[float]) -> float | None:
    """Sample sd over seeds; None below two values."""
    return statistics.stdev(values) if len(values) > 1 else None


def _seed_sd(per_seed_metrics: list[dict], key: str) -> float | None:
    """The sd over seeds of one logged metric (seeds that did not log it are left out)."""
    values = [_to_float(m.get(key)) for m in per_seed_metrics]
    return _sd([v for v in values if v is not None])


def _per_nfe_lines(line: dict, run: dict | None, metric: str, paper: dict, paper_dataset: str,
                   kind: str) -> list[dict]:
    """An SFD-v run (one model) also logged `<metric>/nfe_<k>` at its other trained NFE: one more table line
    per NFE, as the paper shows SFD-v, marked as derived from the row (same run, same training cost)."""
    if run is None or line["status"] != "ok":
        return []
    out = []
    per_seed = (run.get("replicates") or {}).get("metrics") or []
    pattern = re.compile(rf"{re.escape(metric)}/nfe_(\d+)")
    nfes = sorted(int(m.group(1)) for k in run["metrics"] if (m := pattern.fullmatch(k)))
    for k in nfes:
        if k == line["nfe"]:
            continue
        new = {**line, "row_id": f"{line['row_id']}@nfe{k}", "nfe": k, "student_nfe": k, "derived_from": line["row_id"],
               "value_sd": _seed_sd(per_seed, f"{metric}/nfe_{k}"),
               "extra_sd": {m: _seed_sd(per_seed, f"{m}/nfe_{k}") for m in QUALITY_METRICS},
               "value": _to_float(run["metrics"][f"{metric}/nfe_{k}"]),
               "extra": {m: _to_float(run["metrics"][f"{m}/nfe_{k}"]) for m in line["extra"]
                         if f"{m}/nfe_{k}" in run["metrics"]}}
        key = line.get("paper_key")
        prow = None
        if key and re.search(rf"/{line['nfe']}$", str(key)):
            prow = paper["index"].get(re.sub(r"/\d+$", f"/{k}", str(key)))
        elif not key:
            prow = _paper_row({"id": new["row_id"]}, new, paper, paper_dataset, kind)
        new.update({"paper_key": prow["key"] if prow else None,
                    "paper_value": _to_float(prow.get("fid")) if prow else None,
                    "paper_hours": _to_float(prow.get("hours")) if prow else None,
                    "paper_hours_text": prow.get("hours_text") if prow else None})
        out.append(new)
    return out


def _paper_row(srow: dict, labels: dict, paper: dict, dataset: str, kind: str) -> dict | None:
    key = srow.get("paper_key")
    if key:
        return paper["index"].get(key)
    if not srow or ("paper_key" in srow and key is None):  # `paper_key: null`: no paper counterpart
        return None
    if kind == "ablation":
        if paper["ablation"]["dataset"] != dataset:  # the paper's ablation is CIFAR-10's: no other dataset's row
            return None
        for p in paper["ablation"]["rows"]:
            if (_canon(p["method"]) == _canon(labels["method"]) and _canon(p["teacher"]) == _canon(labels["teacher"])
                    and labels["t_min"] is not None and abs(p["t_min"] - labels["t_min"]) < 1e-9
                    and bool(p["afs"]) == bool(labels["afs"]) and _canon(p["loss"]) == _canon(labels["loss"])):
                return {**p, "dataset": paper["ablation"]["dataset"]}
        return None
    for p in paper["comparison"].get(dataset, []):
        if _canon(p["method"]) == _canon(labels["method"]) and p["nfe"] == labels["nfe"]:
            return {**p, "dataset": dataset}
    return None


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------

def _ours_cell(r: dict) -> str:
    if r["status"] == "ok":
        if not _is_num(r.get("n_seeds")):
            return fmt_value(r["value"])
        n, expected = int(r["n_seeds"]), int(r["seeds_expected"])
        sd = f" ± {fmt_value(r['value_sd'])}" if _is_num(r.get("value_sd")) else ""
        return f"{fmt_value(r['value'])}{sd} (n={n}{'' if n == expected else f' of {expected}'})"
    reason = re.sub(r"\s+", " ", str(r.get("reason") or "")).strip()
    reason = f"{reason[:90]}{'…' if len(reason) > 90 else ''}"
    if r["status"] == "failed":
        return f"failed: {reason}"
    return f"{r['status']} ({reason})" if reason else r["status"]


def _run_cell(r: dict) -> str:
    others = r.get("seed_run_ids")
    if isinstance(others, list) and len(others) > 1:
        return f"`{r['run_id']}` +{len(others) - 1} more (seeds {', '.join(str(x) for x in r['seeds'])})"
    return f"`{r['run_id']}`" if r.get("run_id") else "—"


def _delta(data: StudyData, r: dict) -> float | None:
    if data.comparable and r["status"] == "ok" and _is_num(r.get("paper_value")):
        return r["value"] - r["paper_value"]
    return None


def metric_label(data: StudyData) -> str:
    return data.metric


def extra_metrics(data: StudyData) -> list[str]:
    """Quality metrics the rows logged besides the report's metric (a column each; the teacher gap's std
    goes with its mean)."""
    rows = data.rows.to_dict("records") if len(data.rows) else []
    have = {m for r in rows for m in (r.get("extra") or {})}
    return [m for m in QUALITY_METRICS if m in have and m != "teacher_gap_std"]


def _extra_cells(data: StudyData, r: dict) -> dict:
    out = {}
    for m in extra_metrics(data):
        ex = r.get("extra") or {}
        v = ex.get(m)
        text = "—" if v is None else fmt_value(v)
        sds = r.get("extra_sd")  # a dict on replicated rows; absent, or NaN from the DataFrame, elsewhere
        seed_sd = sds.get(m) if isinstance(sds, dict) else None
        if v is not None and _is_num(r.get("n_seeds")):  # a seed mean: its ± is over seeds, as the main column's
            text += (f" ± {fmt_value(seed_sd)}" if _is_num(seed_sd) else "") + f" (n={int(r['n_seeds'])})"
        elif m == "teacher_gap_mean" and v is not None and ex.get("teacher_gap_std") is not None:
            text += f" ± {fmt_value(ex['teacher_gap_std'])}"  # over samples
        out[f"ours ({'teacher_gap' if m == 'teacher_gap_mean' else m})"] = text
    return out


def _shows_guidance(data: StudyData) -> bool:
    rows = data.rows.to_dict("records") if len(data.rows) else []
    return any(r.get("guidance") not in (None, 1.0) for r in rows)


def ablation_table(data: StudyData) -> pd.DataFrame:
    """The paper's ablation layout, rows in the study YAML's (= the paper's) order."""
    out = []
    for r in data.rows.to_dict("records"):
        out.append({"Method": r["method"] or "—", "Teacher": r["teacher"] or "—", "t_min": fmt_tmin(r["t_min"]),
                    "AFS": fmt_afs(r["afs"]), "Loss": r["loss"] or "—",
                    **({"guidance ω": fmt_value(r.get("guidance"))} if _shows_guidance(data) else {}),
                    "NFE": "—" if r["nfe"] is None else str(r["nfe"]),
                    f"ours ({metric_label(data)})": _ours_cell(r), **_extra_cells(data, r),
                    "paper (FID)": fmt_paper(r["paper_value"]), "Δ": fmt_delta(_delta(data, r)),
                    "run id": _run_cell(r)})
    return pd.DataFrame(out)


def comparison_table(data: StudyData) -> pd.DataFrame:
    """Table 2/3 layout: our rows beside the paper's, grouped as the paper groups them; paper-only rows
    (methods we did not run) are labelled 'paper'."""
    ours = data.rows.to_dict("records")
    paper_rows = list(data.paper["comparison"].get(data.paper_dataset, []))
    used = {r["paper_key"] for r in ours if r.get("paper_key")}
    entries = []
    for r in ours:
        entries.append({"group": r.get("group") or "sfd", "method": r["method"] or "—", "nfe": r["nfe"],
                        "source": "ours", "r": r})
    for p in paper_rows:
        if p["key"] not in used:
            entries.append({"group": p["group"], "method": p["method"], "nfe": p["nfe"], "source": "paper", "p": p})
    method_order: dict[tuple, int] = {}
    for e in entries:
        method_order.setdefault((e["group"], _canon(e["method"])), len(method_order))
    group_rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    entries.sort(key=lambda e: (group_rank.get(e["group"], len(GROUP_ORDER)),
                                method_order[(e["group"], _canon(e["method"]))],
                                e["nfe"] if e["nfe"] is not None else 10 ** 6, e["source"] != "ours"))
    labels = data.paper.get("groups", {})
    out = []
    for e in entries:
        if e["source"] == "ours":
            r = e["r"]
            ours_h = fmt_hours(r["device_hours"]) if r["status"] == "ok" else "—"
            out.append({"Group": labels.get(e["group"], e["group"]), "Method": e["method"],
                        "NFE": "—" if e["nfe"] is None else str(e["nfe"]), "Source": "ours",
                        f"ours ({metric_label(data)})": _ours_cell(r), **_extra_cells(data, r),
                        "paper (FID)": fmt_paper(r["paper_value"]),
                        "Δ": fmt_delta(_delta(data, r)),
                        "ours device-h": ours_h + (" (one model)" if r.get("derived_from") or any(
                            x.get("derived_from") == r["row_id"] for x in ours) else ""),
                        "paper A100-h": r.get("paper_hours_text") or "—",
                        "run id": _run_cell(r) + (f" (row {r['derived_from']})" if r.get("derived_from") else "")})
        else:
            p = e["p"]
            out.append({"Group": labels.get(e["group"], e["group"]), "Method": e["method"], "NFE": str(e["nfe"]),
                        "Source": "paper", f"ours ({metric_label(data)})": "—",
                        **{k: "—" for k in _extra_cells(data, {})}, "paper (FID)": fmt_paper(p["fid"]),
                        "Δ": "—", "ours device-h": "—", "paper A100-h": p.get("hours_text") or "—", "run id": "—"})
    return pd.DataFrame(out)


def _objective_names(data: StudyData) -> list[str]:
    names = data.objective_metrics or [data.metric]
    return names


def search_best_table(data: StudyData, top: int = 10) -> pd.DataFrame:
    """Best trials: single objective -> top-k by value; several objectives -> the Pareto front."""
    rows = [r for r in data.rows.to_dict("records") if r["status"] == "ok"]
    names = _objective_names(data)
    dirs = data.directions or ["minimize"] * len(names)
    if len(names) > 1 and data.optuna_study is not None:
        try:
            front = {t.number for t in data.optuna_study.best_trials}
            rows = [r for r in rows if r["trial_number"] in front]
        except Exception:
            pass
        rows.sort(key=lambda r: (r["trial_values"] or [math.inf])[0])
    else:
        sign = -1 if (dirs and dirs[0] == "maximize") else 1

        def key(r):
            v = (r["trial_values"] or [None])[0]
            v = r["value"] if v is None else v
            return sign * v if _is_num(v) else math.inf
        rows.sort(key=key)
        rows = rows[:top]
    space = list((data.spec.get("space") or {}).keys()) or sorted(
        set().union(*[set(r["trial_params"]) for r in rows]) if rows else set())
    out = []
    for i, r in enumerate(rows, 1):
        line = {"rank": str(i), "trial": str(r["trial_number"])}
        vals = r["trial_values"] or []
        for j, n in enumerate(names):
            line[f"objective: {n}"] = fmt_value(vals[j]) if j < len(vals) else "—"
        line[f"ours ({metric_label(data)})"] = fmt_value(r["value"])
        if "student.nfe" not in space:
            line["NFE"] = "—" if r["nfe"] is None else str(r["nfe"])
        for p in space:
            v = r["trial_params"].get(p, r["params"].get(p))
            line[p] = "—" if v is None else (fmt_value(v) if _is_num(v) else str(v))
        line["device-h"] = fmt_hours(r["device_hours"])
        line["run id"] = _run_cell(r)
        out.append(line)
    return pd.DataFrame(out)


def param_importances(data: StudyData) -> tuple[pd.DataFrame, str | None]:
    """Optuna parameter importances (fANOVA, seeded) per objective; (empty frame, reason) when not computable.
    Computed once per StudyData."""
    if "_importances" not in data.cache:
        data.cache["_importances"] = _param_importances(data)
    df, why = data.cache["_importances"]
    return df.copy(), why


def _param_importances(data: StudyData) -> tuple[pd.DataFrame, str | None]:
    import optuna

    if data.optuna_study is None:
        return pd.DataFrame(), "Optuna study not available"
    complete = [t for t in data.optuna_study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 3:
        return pd.DataFrame(), f"only {len(complete)} completed trial(s); importances need at least 3"
    names = _objective_names(data)
    n_obj = len(complete[0].values or [1])
    frames = []
    for i in range(n_obj):
        name = names[i] if i < len(names) else f"objective {i}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(
                    data.optuna_study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                    target=(lambda t, i=i: t.values[i]) if n_obj > 1 else None)
        except Exception as exc:
            return pd.DataFrame(), f"importances could not be computed: {exc}"
        frames.append(pd.DataFrame({"parameter": list(imp), "objective": name, "importance": list(imp.values())}))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if df.empty:
        return df, "no parameter varied across completed trials"
    return df, None


def other_runs_table(data: StudyData) -> pd.DataFrame:
    """Every tracked attempt (including retries and rows not in the YAML) with its status."""
    out = []
    for r in data.runs.to_dict("records"):
        seed = {"seed": str(r["params"].get("seed", "—"))} if data.spec.get("seeds") else {}  # replicates
        out.append({"run id": f"`{r['run_id']}`", "row": r["row"] or "—", **seed,
                    "trial": "—" if r["trial"] is None else str(r["trial"]), "status": r["status"],
                    metric_label(data): fmt_value(_to_float(r["metrics"].get(data.metric))),
                    "device-h": fmt_hours(_to_float(r["metrics"].get("train/device_hours"))),
                    "error": (r["error"] or "")[:80]})
    return pd.DataFrame(out)


def report_tables(data: StudyData) -> dict[str, pd.DataFrame]:
    """The main tables of the report by title (what report.md and the notebook show)."""
    if data.kind == "ablation":
        return {"Ablation (paper's layout and order)": ablation_table(data)}
    if data.kind == "comparison":
        return {f"Comparison (paper's Table {'3' if data.paper_dataset == 'imagenet64' else '2'} layout)":
                comparison_table(data)}
    names = _objective_names(data)
    title = (f"Best trials (Pareto front over {', '.join(names)})" if len(names) > 1 else
             f"Best trials (top 10 by {names[0]})")
    tables = {title: search_best_table(data)}
    imp, _ = param_importances(data)
    if not imp.empty:
        tables["Parameter importances (fANOVA, seed 0)"] = pd.DataFrame(
            {"parameter": imp["parameter"], "objective": imp["objective"],
             "importance": [f"{v:.3f}" for v in imp["importance"]]})
    return tables


def frame_to_markdown(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "_(empty)_\n"
    cols = [str(c) for c in df.columns]

    def cell(v):
        s = "" if v is None else str(v)
        return s.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for rec in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in rec) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Header and reading
# ----------------------------------------------------------------------------------------------------------

def _uniq(values) -> list[str]:
    out = []
    for v in values:
        if v not in (None, "", "None", "null") and str(v) not in out:
            out.append(str(v))
    return out


def header_markdown(data: StudyData) -> str:
    runs = data.runs.to_dict("records")
    P = lambda k: _uniq(r["params"].get(k) for r in runs)  # noqa: E731
    T = lambda k: _uniq(r["tags"].get(k) for r in runs)  # noqa: E731
    rows = data.rows.to_dict("records")
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "failed", "running", "not run")}
    commits = []
    for r in runs:
        c = r["tags"].get("git.commit")
        if c:
            c = c[:12] + (" (dirty)" if str(r["tags"].get("git.dirty", "")).lower() == "true" else "")
            if c not in commits:
                commits.append(c)
    samples = _uniq(fmt_value(r["metrics"]["eval/num_samples"]) for r in runs if "eval/num_samples" in r["metrics"]) \
        or P("eval.num_samples")
    lines = [f"# Report: `{data.study}`" + (" — SMOKE RUNS" if data.smoke else ""), ""]
    if data.spec.get("description"):
        lines += [str(data.spec["description"]).strip(), ""]
    lines += [
        f"- **Kind:** {data.kind} · **MLflow experiment:** `{data.experiment_name}` · "
        f"**parent run:** `{data.parent['run_id']}` · tracking URI `{data.tracking_uri}`",
        f"- **Optuna study:** `{data.parent['tags'].get('optuna.study_name', data.study)}` in `{data.storage}` · "
        f"trials: {len(data.trials)} ({', '.join(f'{k} {v}' for k, v in data.trials['state'].value_counts().items()) or 'none'})",
        f"- **Rows:** {len(rows)} — {counts['ok']} measured, {counts['failed']} failed, {counts['running']} running, "
        f"{counts['not run']} not run",
        f"- **Teacher:** {', '.join(P('teacher.name')) or '—'} · **device:** {', '.join(T('sfd.device') or P('device')) or '—'}"
        f" · **precision:** {', '.join(P('precision')) or '—'}",
        f"- **Samples per evaluation:** {', '.join(samples) or '—'} · **training budget:** "
        f"{', '.join(P('optim.total_kimg')) or '—'} kimg at batch {', '.join(P('optim.batch_size')) or '—'}"
        + (f" · **trials budget:** {data.spec.get('n_trials')}" if data.spec.get("n_trials") else ""),
        f"- **Total training device-hours:** "
        f"{fmt_hours(sum(r['metrics'].get('train/device_hours', 0.0) for r in runs))} · **total wall time:** "
        f"{fmt_value(sum(r['metrics'].get('total/wall_s', 0.0) for r in runs) / 60)} min",
        f"- **Git commit of the runs:** {', '.join(commits) or '—'} · versions: sfd {', '.join(T('version.sfd')) or '—'}, "
        f"torch {', '.join(T('version.torch')) or '—'} · report built at commit {(_git_commit() or '—')[:12]}, "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- **Metric:** `{data.metric}` — {METRIC_DESCRIPTIONS.get(data.metric, data.metric)}"
        + (" (lower is better)" if _lower_is_better(data.metric) else " (higher is better)"),
    ]
    if data.objective_metrics:
        lines.append(f"- **Objective:** {', '.join(data.objective_metrics)} "
                     f"({', '.join(data.directions) or 'minimize'})")
    if data.comparable:
        n = _to_int(samples[0]) if samples else None
        extra = (f" FID here uses {n} samples, the paper 50k: small-sample FID is biased upward, so Δ is "
                 f"indicative." if n and n < 50000 else "")
        lines.append(f"- **Paper column:** the paper's published FID ({data.paper_dataset}), from "
                     f"`reports/paper_numbers.yaml`; Δ = ours − paper.{extra}")
    else:
        why = ("these are smoke runs (random teacher, tiny budget): they test the wiring, not the method"
               if data.smoke else f"our metric is `{data.metric}` on teacher "
               f"{', '.join(P('teacher.name')) or '?'}, the paper's is FID on {data.paper_dataset}")
        lines.append(f"- **Paper column:** the paper's published FID ({data.paper_dataset}) from "
                     f"`reports/paper_numbers.yaml`, **for orientation only** — {why}. Δ is not computed across "
                     f"different metrics; compare the ordering of rows, not the values.")
    if data.kind == "ablation":
        note = data.paper["ablation"].get("note")
        if note:
            lines.append(f"- **Paper's ablation NFE:** {' '.join(str(note).split())}")
    for n in data.notes:
        lines.append(f"- Note: {n}")
    return "\n".join(lines) + "\n"


def _pairs_one_factor(rows: list[dict]) -> list[tuple[str, dict, dict]]:
    def key(r, f):
        v = r.get(f)
        if f == "afs":
            return bool(v)
        if f == "t_min":
            return None if v is None else round(float(v), 9)
        if f == "nfe":  # the student's NFE: guidance doubles the accounted NFE, not the student's steps
            return r.get("student_nfe", v)
        if f == "guidance":
            return 1.0 if v is None else float(v)
        return _canon(v)
    pairs = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            diff = [f for f in FACTORS if key(a, f) != key(b, f)]
            if len(diff) == 1:
                pairs.append((diff[0], a, b))
    return pairs


def _factor_effects(pairs, field_: str) -> dict[str, tuple[float, dict, dict]]:
    best: dict[str, tuple[float, dict, dict]] = {}
    for f, a, b in pairs:
        va, vb = a.get(field_), b.get(field_)
        if not (_is_num(va) and _is_num(vb)):
            continue
        d = vb - va
        if f not in best or abs(d) > abs(best[f][0]):
            best[f] = (d, a, b)
    return best


def _same_direction(ours_delta: float, paper_delta: float, metric: str) -> bool | None:
    """Do our change and the paper's FID change point the same way (both better or both worse)?"""
    if ours_delta == 0 or paper_delta == 0:
        return None
    ours_better = ours_delta < 0 if _lower_is_better(metric) else ours_delta > 0
    return ours_better == (paper_delta < 0)


def _direction_agreement(pairs, metric: str) -> dict[str, tuple[int, int]]:
    """Per factor: (pairs whose change has the paper's sign, pairs with both values), in FACTORS order."""
    out: dict[str, list[int]] = {}
    for f, a, b in pairs:
        if not all(_is_num(x) for x in (a.get("value"), b.get("value"), a.get("paper_value"), b.get("paper_value"))):
            continue
        same = _same_direction(b["value"] - a["value"], b["paper_value"] - a["paper_value"], metric)
        if same is None:
            continue
        hit_n = out.setdefault(f, [0, 0])
        hit_n[0] += int(same)
        hit_n[1] += 1
    return {f: tuple(out[f]) for f in FACTORS if f in out}


def _row_name(r: dict, kind: str = "ablation") -> str:
    if kind == "comparison" and r.get("method") and r.get("nfe") is not None:
        return f"{r['method']} · NFE {r['nfe']}"
    parts = [r.get("method"), r.get("teacher"), None if r.get("t_min") is None else f"t_min={fmt_tmin(r['t_min'])}",
             None if r.get("afs") is None else ("AFS" if r["afs"] else "no AFS"), r.get("loss"),
             None if r.get("nfe") is None else f"NFE {r['nfe']}"]
    return " · ".join(str(p) for p in parts if p) or str(r.get("row_id"))


def _fmt_factor_value(f: str, r: dict) -> str:
    return fmt_afs(r["afs"]) if f == "afs" else (fmt_tmin(r["t_min"]) if f == "t_min" else str(r.get(f)))


def rank_agreement(data: StudyData) -> dict | None:
    """Spearman and Kendall correlation between our values and the paper's over rows that have both."""
    both = [r for r in data.rows.to_dict("records") if r["status"] == "ok" and _is_num(r.get("paper_value"))]
    if len(both) < 3:
        return {"n": len(both), "spearman": None, "kendall": None}
    from scipy import stats

    ours = [r["value"] for r in both]
    if not _lower_is_better(data.metric):  # paper FID: lower is better; align directions
        ours = [-v for v in ours]
    theirs = [r["paper_value"] for r in both]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp = stats.spearmanr(ours, theirs)
        kt = stats.kendalltau(ours, theirs)
    return {"n": len(both), "spearman": float(sp.statistic), "spearman_p": float(sp.pvalue),
            "kendall": float(kt.statistic), "kendall_p": float(kt.pvalue),
            "best_ours": min(both, key=lambda r: r["value"] if _lower_is_better(data.metric) else -r["value"]),
            "best_paper": min(both, key=lambda r: r["paper_value"])}


def _agreement_words(rho: float | None) -> str:
    if rho is None or math.isnan(rho):
        return "cannot be judged (no variation)"
    if rho >= 0.7:
        return "agrees with the paper's"
    if rho >= 0.3:
        return "partly agrees with the paper's"
    if rho > -0.3:
        return "does not follow the paper's"
    return "runs against the paper's"


def _seed_noise_reading(ok: list[dict], metric: str) -> list[str]:
    """How large a difference must be before it is more than seed noise (studies with replicate seeds). Rows
    that gave one value for every seed (solver baselines: the run seed changes only training) say nothing
    about that noise and are left out of the median."""
    replicated = [r for r in ok if _is_num(r.get("value_sd"))]
    if not replicated:
        return []
    n = max(int(r["n_seeds"]) for r in replicated)
    varying = [r["value_sd"] for r in replicated if r["value_sd"] > 0]
    fixed = len(replicated) - len(varying)
    fixed_text = (f" {fixed} row{'s' if fixed != 1 else ''} gave the same value for every seed (nothing in "
                  f"{'them' if fixed != 1 else 'it'} depends on the run seed) and {'are' if fixed != 1 else 'is'} "
                  f"left out.") if fixed else ""
    if not varying:
        return [f"**Seed noise:** each row ran with up to {n} seeds, and every row gave the same value for "
                f"every seed: nothing measured here depends on the run seed."]
    sd = statistics.median(varying)
    return [f"**Seed noise:** each row ran with up to {n} seeds; the median spread (sd) across the "
            f"{len(varying)} rows that vary with the seed is {fmt_value(sd)} in {metric}. Differences between "
            f"rows smaller than about {fmt_value(2 * sd)} are within that noise.{fixed_text}"]


def reading(data: StudyData) -> list[str]:
    """Auto-written reading of the results, as a list of markdown paragraphs."""
    rows = data.rows.to_dict("records")
    m = data.metric
    out: list[str] = []
    if data.smoke:
        out.append("_These are smoke runs (randomly initialised teacher, tiny budget): the reading below is "
                   "produced by the same code as for real runs but says nothing about SFD._")
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        out.append(f"{len(bad)} of {len(rows)} rows have no measurement ("
                   + ", ".join(f"`{r['row_id']}`: {r['status']}" for r in bad[:8])
                   + (", …" if len(bad) > 8 else "") + "); they are left out of everything below.")
    if not ok:
        out.append("No row has a measured value yet, so there is nothing to read.")
        return out
    out += _seed_noise_reading(ok, m)
    if data.kind in ("ablation", "comparison"):
        if data.kind == "ablation":
            pairs = _pairs_one_factor(ok)
            ours_eff = _factor_effects(pairs, "value")
            paper_eff = _factor_effects(_pairs_one_factor(rows), "paper_value")
            if ours_eff:
                f, (d, a, b) = max(ours_eff.items(), key=lambda kv: abs(kv[1][0]))
                rel = f" ({d / a['value'] * 100:+.0f}%)" if a["value"] else ""
                s = (f"**The factor that mattered most in our runs is `{f}`**: among measured rows that differ in "
                     f"that factor alone, changing it from {_fmt_factor_value(f, a)} to {_fmt_factor_value(f, b)} "
                     f"(`{a['row_id']}` → `{b['row_id']}`) moved {m} from {fmt_value(a['value'])} to "
                     f"{fmt_value(b['value'])} (Δ {fmt_delta(d)}{rel}).")
                if _is_num(a.get("paper_value")) and _is_num(b.get("paper_value")):
                    pd_ = b["paper_value"] - a["paper_value"]
                    same = _same_direction(d, pd_, m)
                    s += (f" The paper's FID for the same pair goes {fmt_paper(a['paper_value'])} → "
                          f"{fmt_paper(b['paper_value'])}"
                          + (" (the same direction)." if same else " (the opposite direction)." if same is False
                             else "."))
                out.append(s)
                order_ours = sorted(ours_eff, key=lambda k: -abs(ours_eff[k][0]))
                txt = "Largest single-factor change per factor, ours: " + ", ".join(
                    f"{k} {fmt_delta(ours_eff[k][0])}" for k in order_ours) + "."
                if paper_eff:
                    order_paper = sorted(paper_eff, key=lambda k: -abs(paper_eff[k][0]))
                    txt += (" Paper (same rows, FID): " + ", ".join(f"{k} {fmt_delta(paper_eff[k][0])}"
                                                                     for k in order_paper) + ".")
                    txt += (" By the size of its largest change, the most influential factor is the same as in "
                            "the paper." if order_paper and order_paper[0] == order_ours[0] else
                            f" The paper's most influential factor is `{order_paper[0]}`.")
                out.append(txt)
                agree = _direction_agreement(pairs, m)
                if agree:
                    tot = sum(v[1] for v in agree.values())
                    hit = sum(v[0] for v in agree.values())
                    out.append(f"**Direction of each single-factor change vs the paper:** the same sign as the "
                               f"paper's FID change on {hit} of {tot} one-factor pairs ("
                               + ", ".join(f"{f} {h}/{n}" for f, (h, n) in agree.items()) + ").")
            else:
                out.append("No two measured rows differ in exactly one factor, so no single factor can be isolated.")
        else:
            by_method: dict[str, list[dict]] = {}
            for r in ok:
                if r["nfe"] is not None:
                    by_method.setdefault(str(r["method"]), []).append(r)
            effects = []
            for meth, rs in by_method.items():
                if len(rs) >= 2:
                    rs = sorted(rs, key=lambda r: r["nfe"])
                    effects.append((rs[-1]["value"] - rs[0]["value"], meth, rs[0], rs[-1]))
            if effects:
                d, meth, a, b = max(effects, key=lambda e: abs(e[0]))
                out.append(f"**NFE matters most for {meth}**: NFE {a['nfe']} → {b['nfe']} moves {m} from "
                           f"{fmt_value(a['value'])} to {fmt_value(b['value'])} (Δ {fmt_delta(d)}).")
            out.extend(_same_nfe_comparisons(data, ok))
            best = min(ok, key=lambda r: r["value"] if _lower_is_better(m) else -r["value"])
            out.append(f"Best measured row: `{best['row_id']}` ({_row_name(best, data.kind)}) with {m} = "
                       f"{fmt_value(best['value'])}" + (f" after {fmt_hours(best['device_hours'])} training "
                                                        f"device-hours." if _is_num(best['device_hours']) else "."))
        ra = rank_agreement(data)
        if ra and ra["spearman"] is not None:
            out.append(f"**Ordering vs the paper** over the {ra['n']} rows measured by both: Spearman ρ = "
                       f"{ra['spearman']:.2f} (p {fmt_p(ra['spearman_p'])}), Kendall τ = {ra['kendall']:.2f} "
                       f"(p {fmt_p(ra['kendall_p'])}) — our ordering {_agreement_words(ra['spearman'])}. "
                       f"Our best row is `{ra['best_ours']['row_id']}`, the paper's best among these is "
                       f"`{ra['best_paper']['row_id']}`."
                       + ("" if data.comparable else f" (Ranks compare {m} with the paper's FID; rank correlation "
                                                    f"is scale-free, but the two metrics measure different things.)"))
        elif ra:
            out.append(f"Only {ra['n']} row(s) have both our value and a paper value; at least 3 are needed to "
                       f"compare orderings.")
    else:
        imp, why = param_importances(data)
        if not imp.empty:
            n_done = int((data.trials["state"] == "COMPLETE").sum()) if len(data.trials) else 0
            caveat = "; with so few trials this is indicative only" if n_done < 10 else ""
            for objective, rows in imp.groupby("objective", sort=False):  # one answer per objective: quality
                first = rows.sort_values("importance", ascending=False).iloc[0]  # and cost differ in what drives them
                out.append(f"**Most important parameter for {objective}:** `{first['parameter']}` (fANOVA "
                           f"importance {first['importance']:.2f}, from {n_done} completed trials{caveat}).")
        else:
            out.append(f"Parameter importances: {why}.")
        best = search_best_table(data, top=1)
        if not best.empty:
            b = best.iloc[0].to_dict()
            params = ", ".join(f"{k}={v}" for k, v in b.items()
                               if k not in ("rank", "trial", "run id", "NFE", "device-h") and not k.startswith(
                                   ("objective", "ours")))
            lead = ("**Best trial on the Pareto front by the first objective:**" if len(_objective_names(data)) > 1
                    else "**Best trial:**")
            out.append(f"{lead} #{b['trial']} with {m} = {b[f'ours ({metric_label(data)})']} ({params}).")
            # a paper-shaped check: does the best trial make the paper's choices?
            best_row = next((r for r in data.rows.to_dict("records") if str(r["trial_number"]) == b["trial"]), None)
            if best_row is not None:
                cfg = {**best_row["params"], **{k: str(v) for k, v in best_row["trial_params"].items()}}
                checks = []
                for key, want, show in (("solver.name", "dpmpp3m", "teacher DPM++(3M)"),
                                        ("student.t_min", "0.006", "t_min = 0.006"),
                                        ("student.afs", "true", "AFS on"), ("loss.name", "l1", "L1 loss")):
                    if key in cfg:
                        got = str(cfg[key]).lower()
                        same = (abs(float(got) - float(want)) < 1e-9) if key == "student.t_min" else got == want
                        val = fmt_value(_to_float(cfg[key])) if key == "student.t_min" else cfg[key]
                        checks.append(f"{show}: {'yes' if same else f'no ({val})'}")
                if checks:
                    out.append("Does the best trial make the paper's choices? " + "; ".join(checks) + ".")
    return out


def _same_nfe_comparisons(data: StudyData, ok: list[dict]) -> list[str]:
    """Comparison reading: SFD-v (one model) against the separately distilled SFD students at each NFE, and
    the second stage against the solver rows at its NFE, on every metric the rows logged."""
    metrics = [data.metric] + extra_metrics(data)

    def vals(r):
        ex = r.get("extra") or {}
        return ", ".join(f"{mm} {fmt_value(r['value'] if mm == data.metric else ex.get(mm))}" for mm in metrics)

    def better(a, b):
        return a["value"] < b["value"] if _lower_is_better(data.metric) else a["value"] > b["value"]

    out = []
    by = lambda g: [r for r in ok if r.get("group") == g and r.get("nfe") is not None]  # noqa: E731
    sfd = {r["nfe"]: r for r in by("sfd")}
    pairs = [(v, sfd[v["nfe"]]) for v in sorted(by("sfd-v"), key=lambda r: r["nfe"]) if v["nfe"] in sfd]
    if pairs:
        wins = sum(better(v, s) for v, s in pairs)
        out.append("**SFD-v (one model) vs separately distilled SFD at the same NFE:** " + "; ".join(
            f"NFE {v['nfe']}: SFD-v {vals(v)} vs SFD {vals(s)}" for v, s in pairs)
                   + f". SFD-v is better by {data.metric} at {wins} of {len(pairs)} NFE.")
    for st in by("second-stage"):
        rivals = [r for r in by("solver") if r["nfe"] == st["nfe"]]
        if rivals:
            out.append(f"**Second stage at {st['nfe']} NFE** (`{st['row_id']}`: {vals(st)}) vs the solver rows at "
                       f"the same NFE: " + "; ".join(f"`{r['row_id']}` {vals(r)}" for r in rivals) + " — "
                       + ("better than all of them." if all(better(st, r) for r in rivals) else
                          "not better than all of them.") + f" (by {data.metric})")
    return out


def reading_markdown(data: StudyData) -> str:
    return "## Reading of the results (auto-written)\n\n" + "\n\n".join(reading(data)) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------

def _plt():
    # Figure objects without pyplot: no GUI backend is ever touched, savefig renders with Agg.
    from matplotlib.figure import Figure

    return Figure


def _series_name(data: StudyData, r: dict) -> str:
    """Comparison rows: one line per method. Ablation/search rows: one series per configuration without NFE."""
    if data.kind == "comparison":
        return str(r["method"])
    parts = [r.get("method"), r.get("teacher"), None if r.get("t_min") is None else f"t_min {fmt_tmin(r['t_min'])}",
             None if r.get("afs") is None else ("AFS" if r["afs"] else "no AFS"), r.get("loss"),
             None if r.get("guidance") in (None, 1.0) else f"ω {fmt_value(r['guidance'])}"]
    return " · ".join(str(p) for p in parts if p)


def fig_metric_vs_nfe(data: StudyData):
    """Ours (solid) vs NFE per method; the paper's FID (dashed) for the same methods and SFD."""
    Figure = _plt()
    ok = [r for r in data.rows.to_dict("records") if r["status"] == "ok" and r["nfe"] is not None]
    if not ok:
        return None
    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    series: dict[str, list[dict]] = {}
    for r in ok:
        series.setdefault(_series_name(data, r), []).append(r)
    colors = {}
    for i, (name, rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r["nfe"])
        (line,) = ax.plot([r["nfe"] for r in rs], [r["value"] for r in rs], "-o" if len(rs) > 1 else "o",
                          label=f"ours: {name}")
        colors[_canon(rs[0]["method"])] = line.get_color()
    ax.set_xlabel("NFE")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"ours: {data.metric}")
    values = [r["value"] for r in ok]
    if min(values) > 0 and max(values) / min(values) > 30:  # e.g. a 1-step solver far above the rest
        ax.set_yscale("log")
        ax.set_ylabel(f"ours: {data.metric} (log)")
    pax = ax if data.comparable else ax.twinx()
    paper = paper_comparison_frame(data.paper, data.paper_dataset)
    wanted = {_canon(r["method"]) for r in ok} | {"sfd"}
    for meth, grp in paper.groupby("method", sort=False):
        if _canon(meth) not in wanted:
            continue
        grp = grp.sort_values("nfe")
        pax.plot(grp["nfe"], grp["fid"], "--", marker="x", color=colors.get(_canon(meth)), alpha=0.8,
                 label=f"paper: {meth}")
    if pax is not ax:
        pax.set_ylabel(f"paper FID ({data.paper_dataset}, orientation only)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = (pax.get_legend_handles_labels() if pax is not ax else ([], []))
    ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="upper left", bbox_to_anchor=(1.12, 1.0))
    ax.set_title(f"{data.study}: {data.metric} vs NFE (ours solid, paper dashed)")
    fig.tight_layout()
    return fig


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def fig_metric_vs_hours(data: StudyData):
    """The 'fast' claim: metric vs training device-hours, with our Pareto front and the paper's points."""
    Figure = _plt()
    ok = [r for r in data.rows.to_dict("records") if r["status"] == "ok" and _is_num(r.get("device_hours"))]
    if not ok:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    pos = [r["device_hours"] for r in ok if r["device_hours"] > 0]
    floor = (min(pos) / 3) if pos else 1e-4
    xs = [max(r["device_hours"], floor) for r in ok]
    sign = 1 if _lower_is_better(data.metric) else -1
    ax.scatter(xs, [r["value"] for r in ok], label="ours", zorder=3)
    for x, r in zip(xs, ok):
        ax.annotate(str(r["row_id"]), (x, r["value"]), fontsize=6, alpha=0.8, xytext=(3, 3),
                    textcoords="offset points")
    front = _pareto([(x, sign * r["value"]) for x, r in zip(xs, ok)])
    ax.plot([p[0] for p in front], [sign * p[1] for p in front], "-", drawstyle="steps-post", label="ours: Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("training device-hours (log; untrained rows drawn at the left edge)")
    ax.set_ylabel(f"ours: {data.metric}")
    paper = paper_comparison_frame(data.paper, data.paper_dataset)
    paper = paper[paper["hours"].notna()]
    if len(paper):
        pax = ax if data.comparable else ax.twinx()
        pax.scatter(paper["hours"].astype(float), paper["fid"], marker="x", color="gray", label="paper (A100-h)")
        for _, p in paper.iterrows():
            # a bound such as "<0.01" is drawn at its value: the label says it is a bound
            bound = f" ({p['hours_text']} h)" if str(p["hours_text"] or "").startswith(("<", ">")) else ""
            pax.annotate(f"{p['method']} {p['nfe']}{bound}", (float(p["hours"]), p["fid"]), fontsize=6,
                         color="gray", xytext=(3, -8), textcoords="offset points")
        if pax is not ax:
            pax.set_ylabel(f"paper FID ({data.paper_dataset}, orientation only)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = (pax.get_legend_handles_labels() if pax is not ax else ([], []))
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    else:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    ax.set_title(f"{data.study}: {data.metric} vs training cost")
    fig.tight_layout()
    return fig


def _row_panels(data: StudyData, available: dict, width: float, height: float):
    """A figure with one panel per row whose run has an entry in `available` (loss histories, sample grids),
    four panels to a line: (figure, [(axes, row), ...]), or None when no row has one."""
    Figure = _plt()
    rows = [r for r in data.rows.to_dict("records") if r.get("run_id") in available and not r.get("derived_from")]
    if not rows:
        return None
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(width * cols, height * nrows))
    return fig, [(fig.add_subplot(nrows, cols, i + 1), r) for i, r in enumerate(rows)]


def fig_loss_curves(data: StudyData):
    """Per-student-step training loss (metric histories loss/step_<k>) for every row that trained."""
    panels = _row_panels(data, data.histories, 3.2, 2.6)
    if panels is None:
        return None
    fig, axes_rows = panels
    for ax, r in axes_rows:
        h = data.histories[r["run_id"]]
        for k, g in h.groupby("key", sort=False):
            g = g.sort_values("step")
            step = g["student_step"].iloc[0]
            ax.plot(g["step"], g["value"], lw=0.9, label=f"step {step}" if step != "mean" else "loss (mean)")
        if (h["value"] > 0).all():
            ax.set_yscale("log")
        ax.set_title(str(r["row_id"]), fontsize=7)
        ax.tick_params(which="both", labelsize=6)
        ax.set_xlabel("iteration", fontsize=6)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=5)
    fig.suptitle(f"{data.study}: training loss per student step", fontsize=9)
    fig.tight_layout()
    return fig


def fig_ablation_bars(data: StudyData):
    """Ablation rows: ours vs the paper side by side (two axes when the metrics differ)."""
    Figure = _plt()
    rows = data.rows.to_dict("records")
    if not rows:
        return None
    fig = Figure(figsize=(max(6, 0.7 * len(rows) + 2), 4.5))
    ax = fig.add_subplot()
    x = list(range(len(rows)))
    ours = [r["value"] if r["status"] == "ok" else 0 for r in rows]
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label=f"ours ({data.metric})")
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            ax.text(i - 0.2, 0, r["status"], rotation=90, fontsize=6, va="bottom", ha="center", color="red")
    pax = ax
    has_paper = any(_is_num(r.get("paper_value")) for r in rows)
    if has_paper:  # no paper bars (nor axis) for rows without one
        pax = ax if data.comparable else ax.twinx()
        pv = [r["paper_value"] if _is_num(r.get("paper_value")) else 0 for r in rows]
        pax.bar([i + 0.2 for i in x], pv, width=0.4, color="gray", alpha=0.6, label="paper (FID)")
        if pax is not ax:
            pax.set_ylabel("paper FID (orientation only)")
    ax.set_ylabel(f"ours: {data.metric}")
    ax.set_xticks(x)
    ax.set_xticklabels([str(r["row_id"]) for r in rows], rotation=45, ha="right", fontsize=6)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = (pax.get_legend_handles_labels() if pax is not ax else ([], []))
    ax.legend(h1 + h2, l1 + l2, fontsize=7)
    ax.set_title(f"{data.study}: ours vs paper per ablation row" if has_paper else
                 f"{data.study}: ours per row (no paper counterpart)")
    fig.tight_layout()
    return fig


def fig_param_importances(data: StudyData):
    Figure = _plt()
    imp, _ = param_importances(data) if data.kind == "search" else (pd.DataFrame(), None)
    if imp.empty:
        return None
    objs = list(dict.fromkeys(imp["objective"]))
    fig = Figure(figsize=(6, 1 + 0.4 * imp["parameter"].nunique() * len(objs)))
    ax = fig.add_subplot()
    params = list(dict.fromkeys(imp["parameter"]))
    height = 0.8 / len(objs)
    for j, o in enumerate(objs):
        g = imp[imp["objective"] == o].set_index("parameter")
        ax.barh([i + j * height for i in range(len(params))], [g["importance"].get(p, 0.0) for p in params],
                height=height, label=str(o))
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(params))])
    ax.set_yticklabels(params, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("fANOVA importance (seed 0)")
    ax.legend(fontsize=7)
    ax.set_title(f"{data.study}: parameter importances")
    fig.tight_layout()
    return fig


def fig_optimization_history(data: StudyData):
    Figure = _plt()
    if data.kind != "search" or data.trials.empty:
        return None
    done = data.trials[data.trials["state"] == "COMPLETE"]
    done = done[done["values"].map(lambda v: bool(v))]
    if done.empty:
        return None
    names = _objective_names(data)
    nobj = len(done.iloc[0]["values"])
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if nobj == 1:
        vals = [v[0] for v in done["values"]]
        maximize = bool(data.directions) and data.directions[0] == "maximize"
        best, cur = [], None
        for v in vals:
            cur = v if cur is None else (max(cur, v) if maximize else min(cur, v))
            best.append(cur)
        ax.scatter(done["number"], vals, s=14, label="trial")
        ax.plot(done["number"], best, "r-", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(names[0] if names else "objective")
        ax.set_title(f"{data.study}: optimisation history")
    else:
        a = [v[0] for v in done["values"]]
        b = [v[1] for v in done["values"]]
        ax.scatter(a, b, c=done["number"], cmap="viridis", s=16)
        ax.set_xlabel(names[0] if names else "objective 0")
        ax.set_ylabel(names[1] if len(names) > 1 else "objective 1")
        ax.set_title(f"{data.study}: trials in objective space (colour = trial number)")
    ax.legend(fontsize=7) if nobj == 1 else None
    fig.tight_layout()
    return fig


def fig_sample_grids(data: StudyData):
    """Each row's samples.png artifact, one panel per row."""
    import matplotlib.image as mpimg

    panels = _row_panels(data, data.samples, 3, 3.2)
    if panels is None:
        return None
    fig, axes_rows = panels
    for ax, r in axes_rows:
        img = mpimg.imread(str(data.samples[r["run_id"]]))
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{r['row_id']}\n{data.metric} = {fmt_value(r['value'])}", fontsize=7)
    fig.suptitle(f"{data.study}: samples per row", fontsize=9)
    fig.tight_layout()
    return fig


FIGURES = {
    "metric_vs_nfe": fig_metric_vs_nfe,
    "metric_vs_hours": fig_metric_vs_hours,
    "ablation_bars": fig_ablation_bars,
    "loss_curves": fig_loss_curves,
    "param_importances": fig_param_importances,
    "optimization_history": fig_optimization_history,
    "sample_grids": fig_sample_grids,
}
FIGURE_TITLES = {
    "metric_vs_nfe": "Metric vs NFE (ours solid, paper dashed)",
    "metric_vs_hours": "Metric vs training device-hours (Pareto view)",
    "ablation_bars": "Ours vs paper per ablation row",
    "loss_curves": "Training loss per student step",
    "param_importances": "Optuna parameter importances",
    "optimization_history": "Optuna optimisation history",
    "sample_grids": "Sample grids per row",
}


def make_figures(data: StudyData) -> dict[str, Any]:
    """All figures that apply to this study, by name (None-returning ones are left out)."""
    out = {}
    for name, fn in FIGURES.items():
        if name == "ablation_bars" and data.kind != "ablation":
            continue
        try:
            fig = fn(data)
        except Exception as exc:  # a figure must never sink the report; say what went wrong
            data.notes.append(f"figure {name} failed: {exc}")
            fig = None
        if fig is not None:
            out[name] = fig
    return out


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def save_figures(data: StudyData, fig_dir: str | Path) -> dict[str, Path]:
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    saved = {}
    for name, fig in make_figures(data).items():
        fig.savefig(fig_dir / f"{name}.png", dpi=110)
        fig.savefig(fig_dir / f"{name}.svg")
        saved[name] = fig_dir / f"{name}.png"
    # the raw sample grids, one file per row, next to the composed figure
    rows = {r["run_id"]: r for r in data.rows.to_dict("records") if r.get("run_id")}
    for run_id, path in data.samples.items():
        dst = fig_dir / "samples" / f"{_slug(rows[run_id]['row_id'])}.png"
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, dst)
    return saved


# ----------------------------------------------------------------------------------------------------------
# report.md, notebook, html, logging
# ----------------------------------------------------------------------------------------------------------

def report_markdown(data: StudyData, figures: dict[str, Path] | None = None, fig_rel: str = "figures") -> str:
    parts = [header_markdown(data)]
    for title, df in report_tables(data).items():
        parts.append(f"## {title}\n\n{frame_to_markdown(df)}")
    if data.kind == "search":
        imp, why = param_importances(data)
        if imp.empty:
            parts.append(f"_Parameter importances: {why}._\n")
    if data.kind == "comparison":
        parts.append("Rows with Source `paper` are the paper's published numbers for methods this study did not "
                     "run; they are never measured here.\n")
    if figures:
        parts.append("## Figures\n\n" + "\n\n".join(
            f"### {FIGURE_TITLES.get(n, n)}\n\n![{n}]({fig_rel}/{n}.png)" for n in figures) + "\n")
    parts.append(reading_markdown(data))
    runs_tbl = other_runs_table(data)
    if not runs_tbl.empty:
        parts.append("## All tracked runs (every attempt)\n\n" + frame_to_markdown(runs_tbl))
    return "\n".join(parts)


def _nb_literal(v) -> str:
    return repr(str(v)) if isinstance(v, Path) else repr(v)


def write_notebook(data: StudyData, path: str | Path, *, spec_ref: str | None) -> Path:
    """A notebook whose cells reload the study from MLflow/Optuna through this module (no baked-in numbers)."""
    import nbformat
    from nbformat import v4

    nb = v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [
        v4.new_markdown_cell(f"# Study report: `{data.study}`\n\nGenerated by `reports/build.py`. Every number "
                             "below is read from the MLflow runs and the Optuna study when the notebook runs; the "
                             "paper's numbers come from `reports/paper_numbers.yaml`. Re-run all cells to refresh."),
        v4.new_code_cell(
            "import os, sys\n"
            "os.environ.setdefault('MLFLOW_DISABLE_TELEMETRY', 'true')\n"
            f"REPO = {_nb_literal(str(REPO_ROOT))}\n"
            "if REPO not in sys.path:\n    sys.path.insert(0, REPO)\n"
            f"STUDY = {_nb_literal(data.study)}\n"
            f"TRACKING_URI = {_nb_literal(data.tracking_uri)}\n"
            f"STORAGE = {_nb_literal(data.storage)}\n"
            f"SMOKE = {data.smoke!r}\n"
            f"SPEC = {_nb_literal(spec_ref)}\n"
            "from IPython.display import Image, Markdown, display\n"
            "from reports import build as rb\n"
            "print('kernel interpreter:', sys.executable)\n"
            "data = rb.load_study_data(STUDY, storage=STORAGE, tracking_uri=TRACKING_URI, smoke=SMOKE, spec=SPEC)\n"
            "display(Markdown(rb.header_markdown(data)))"),
        v4.new_markdown_cell("## Tables"),
        v4.new_code_cell(
            "for title, df in rb.report_tables(data).items():\n"
            "    display(Markdown(f'### {title}\\n\\n' + rb.frame_to_markdown(df)))"),
        v4.new_markdown_cell("### The rows as loaded (pandas)"),
        v4.new_code_cell(
            "cols = ['row_id', 'method', 'teacher', 't_min', 'afs', 'loss', 'nfe', 'status', 'reason', 'value',\n"
            "        'value_sd', 'n_seeds', 'paper_value', 'device_hours', 'run_id', 'trial_number']\n"
            "data.rows[[c for c in cols if c in data.rows.columns]]"),
        v4.new_markdown_cell("## Figures"),
        v4.new_code_cell(
            "for name, fig in rb.make_figures(data).items():\n"
            "    display(Markdown(f'### {rb.FIGURE_TITLES.get(name, name)}'))\n"
            "    display(Image(data=rb.figure_png(fig)))"),
        v4.new_code_cell("display(Markdown(rb.reading_markdown(data)))"),
    ]
    path = Path(path)
    nbformat.write(nb, str(path))
    return path


def _kernel_manager(tmp: Path):
    """A kernel that runs on THIS interpreter (the venv's ipykernel), whatever kernelspecs the user has."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kdir = tmp / "kernels" / "python3"
    kdir.mkdir(parents=True, exist_ok=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")])
    ksm.ensure_native_kernel = False
    # ipc: local sockets (files in the temporary folder), no TCP ports and no plain-TCP warning
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm, transport="ipc", ip=str(tmp / "kernel"))


def run_notebook(path: str | Path, *, cwd: str | Path | None = None, timeout: int = 600) -> Path:
    """Execute in place, headless (nbclient); the notebook is saved with its outputs even when a cell fails."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(str(path), as_version=4)
    with tempfile.TemporaryDirectory(prefix="sfd-kernel-") as tmp:
        client = NotebookClient(nb, km=_kernel_manager(Path(tmp)), timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(cwd or path.parent)}})
        try:
            client.execute(cleanup_kc=True)  # we pass the manager, so ask nbclient to shut the kernel down now
        finally:
            nbformat.write(nb, str(path))
    return path


def export_html(nb_path: str | Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    nb_path = Path(nb_path)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(nb_path), as_version=4))
    out = nb_path.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


# What a build writes into its folder; anything else there (a user's own files) is left alone.
REPORT_ENTRIES = ("report.md", "report.ipynb", "report.html", "study.yaml", "figures")


def log_report(data: StudyData, out_dir: str | Path) -> None:
    """Log the report's entries under ``report/`` on the study's parent run."""
    from mlflow.tracking import MlflowClient

    out_dir = Path(out_dir)
    client = MlflowClient(tracking_uri=data.tracking_uri)
    run_id = data.parent["run_id"]
    for name in REPORT_ENTRIES:
        path = out_dir / name
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=f"report/{name}")
        elif path.is_file():
            client.log_artifact(run_id, str(path), artifact_path="report")
    client.set_tag(run_id, "sfd.report", "report/report.md")


def publish_report(stage: Path, out: Path) -> None:
    """Move a finished build from `stage` into `out`, entry by entry (a rename each: same filesystem).

    Entries of an earlier build that this one did not make (an html after a --no-notebook build) go, so the
    folder never mixes two builds."""
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_ENTRIES:
        src, dst = stage / name, out / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        if src.exists():
            os.replace(src, dst)


def _build_in(stage: Path, data: StudyData, execute_notebook: bool) -> Exception | None:
    """Write every report entry into `stage`; returns the notebook's execution error, if any."""
    # the study definition the report was built against travels with it; the notebook finds it beside itself
    spec_ref = str(Path(data.spec_path).resolve()) if data.spec_path and Path(data.spec_path).is_file() else None
    if data.spec:
        (stage / "study.yaml").write_text(yaml.safe_dump(data.spec, sort_keys=False))
        spec_ref = spec_ref or "study.yaml"
    figures = save_figures(data, stage / "figures")
    (stage / "report.md").write_text(report_markdown(data, figures), encoding="utf-8")
    nb_path = write_notebook(data, stage / "report.ipynb", spec_ref=spec_ref)
    if not execute_notebook:
        return None
    try:
        run_notebook(nb_path, cwd=stage)
    except Exception as exc:  # the executed notebook shows the failing cell: keep it, then fail loudly
        error = exc
    else:
        error = None
    export_html(nb_path)
    return error


def build_report(study_name: str, *, storage: str | None = None, tracking_uri: str | None = None,
                 out_dir: str | Path | None = None, smoke: bool = False, execute_notebook: bool = True,
                 log_to_mlflow: bool = True, spec: str | Path | dict | None = None) -> Path:
    """Build report.md, figures/, report.ipynb (+ .html) for a study; returns the path of report.md.

    The report is built in a hidden folder beside `out_dir` and moved in only when complete, so a build
    that fails (a study that cannot be loaded, a figure that cannot be drawn) leaves an earlier report whole
    and creates no folder. A notebook that fails to execute is the exception: the report is published and
    logged with the failing cell's output, then the build fails loudly."""
    out = Path(out_dir) if out_dir else DEFAULT_OUT_ROOT / (f"{study_name}-smoke" if smoke else study_name)
    with tempfile.TemporaryDirectory(prefix="sfd-report-art-") as art:
        data = load_study_data(study_name, storage=storage, tracking_uri=tracking_uri, smoke=smoke, spec=spec,
                               artifact_dir=art)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}-building-", dir=out.parent) as stage:
            error = _build_in(Path(stage), data, execute_notebook)
            publish_report(Path(stage), out)
    if log_to_mlflow:
        log_report(data, out)
    if error is not None:
        raise ReportError(f"report notebook {out / 'report.ipynb'} failed to execute: {error}") from error
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rebuild the paper's tables for a study from its tracked runs.")
    ap.add_argument("study", help="study name (studies/<name>.yaml; MLflow experiment of the same name)")
    ap.add_argument("--out", help="output folder (default reports/out/<study>/)")
    ap.add_argument("--storage", help="Optuna storage URL (default: the parent run's optuna.storage tag)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI or runs/mlflow.db)")
    ap.add_argument("--smoke", action="store_true", help="report on the smoke runs (<study>-smoke) instead")
    ap.add_argument("--spec", help="study YAML (default studies/<study>.yaml)")
    ap.add_argument("--no-notebook", action="store_true", help="write the notebook but do not execute it")
    ap.add_argument("--no-log", action="store_true", help="do not log the report on the parent MLflow run")
    args = ap.parse_args(argv)
    try:
        path = build_report(args.study, storage=args.storage, tracking_uri=args.tracking_uri, out_dir=args.out,
                            smoke=args.smoke, execute_notebook=not args.no_notebook, log_to_mlflow=not args.no_log,
                            spec=args.spec)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")
    sys.exit(main())
