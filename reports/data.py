"""The data side of a study's report: constants, small helpers and formatters, the paper's numbers, the study
spec, the stores, and loading a study from Optuna + MLflow into a `StudyData` (`load_study_data`).

Part of the report builder (``reports/build.py``); imports nothing from the other ``reports`` modules."""
from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import contextlib
import difflib
import math
import re
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from sfd import tracking as sfd_tracking
from sfd.storelock import store_identity

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


def _uniq(values) -> list[str]:
    out = []
    for v in values:
        if v not in (None, "", "None", "null") and str(v) not in out:
            out.append(str(v))
    return out


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
    try:
        with open(path) as f:
            return (yaml.safe_load(f) or {}), str(path)
    except yaml.YAMLError as exc:
        raise ReportError(f"study YAML {path} is not valid YAML: {exc}") from None


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
    if len(parents) > 1 and storage:  # one study name in two Optuna storages: each has its own parent run
        mine = [p for p in parents if p["tags"].get("optuna.storage") == store_identity(storage)]
        parents = mine or parents
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
