"""Loading a study for its report: the study file, the stores, its MLflow parent and child runs and its Optuna
trials, read into a `StudyData` (`load_study_data`) whose `rows` are the report's table lines.

The study file is read through `sfd.study.read_study_file` (the engine's reader) and its fields taken as
written: a report of recorded runs must build even when the file no longer passes the engine's checks (a
`--seeds` copy names its base by an absolute path of the machine that ran it). Runs are found by the tags in
`sfd.tracking`, page by page (`find_runs`).

Part of the report builder (``reports/build.py``); imports ``reports.formatting``, ``reports.paper`` and
``reports.rows``."""
from __future__ import annotations

import difflib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from reports.formatting import slug, to_int, uniq
from reports.paper import load_paper_numbers, teacher_dataset
from reports.rows import row_lines, skipped_rows, trial_lines
from sfd import tracking as T
from sfd.metrics.names import METRICS, QUALITY_KEYS
from sfd.storelock import store_identity
from sfd.study import StudyError, available_studies, read_study_file, row_key

REPO_ROOT = Path(__file__).resolve().parents[1]
# The metric a report shows when the study's objective names none: the first of these its runs logged.
HEADLINE_KEYS = tuple(m.logged[0] for m in METRICS.values())


class ReportError(RuntimeError):
    """A report cannot be built (no such study, no runs); the message says what was looked for and where."""


@dataclass
class StudyData:
    study: str
    kind: str
    smoke: bool
    spec: dict                    # the study file's fields as written ({} when there is none)
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
    # where `samples` were downloaded when the caller gave no folder (the notebook's kernel): removed with the data,
    # or when the interpreter exits, so no build or notebook leaves a temporary folder behind
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI (a tracking server), else None."""
        return T.run_url(self.tracking_uri, self.experiment_id, run_id)


# ----- the study file --------------------------------------------------------------------------------------

def load_study_spec(study_name: str, spec: str | Path | dict | None = None) -> tuple[dict, str | None]:
    """The study file's fields: a dict as given, a path, else ``studies/<name>.yaml``; ({}, None) when there
    is no such file in studies/."""
    if isinstance(spec, dict):
        return dict(spec), None
    if spec is None and study_name not in {p.stem for p in available_studies()}:
        return {}, None
    try:
        path, data = read_study_file(str(spec or study_name))
    except StudyError as exc:
        raise ReportError(f"study YAML: {exc}") from None
    return data, str(path)


def spec_name(study_name: str, spec: str | Path | dict) -> tuple[str, str | None]:
    """The study a study file defines (a file without `name:` names its study after itself, as the engine
    reads it) and where that file is."""
    data, path = load_study_spec(study_name, spec)
    return str(data.get("name", Path(path).stem if path else study_name)), path


def _spec_from_parent(client, parent: dict, art_dir: str | Path) -> tuple[dict, str | None]:
    """The study file the runner recorded: the parent's `sfd.spec_path` if that file is here, else a study
    YAML logged on the parent run."""
    path = parent["tags"].get(T.TAG_SPEC_PATH)
    if path and Path(path).is_file():
        return load_study_spec("", path)
    try:
        names = [a.path for a in client.list_artifacts(parent["run_id"]) if a.path.endswith((".yaml", ".yml"))]
    except Exception:  # noqa: BLE001 - an artifact store that cannot be listed: no recorded file
        names = []
    for name in names:
        local = client.download_artifacts(parent["run_id"], name, tempfile.mkdtemp(prefix="sfd-spec-", dir=art_dir))
        data, _ = load_study_spec("", local)
        if isinstance(data, dict) and ("rows" in data or "space" in data):
            return data, f"runs:/{parent['run_id']}/{name}"
    return {}, None


# ----- the stores --------------------------------------------------------------------------------------------

def _sqlite_file(uri: str | None) -> Path | None:
    """The file behind a sqlite URL (``sqlite:///relative`` or ``sqlite:////absolute``), else None."""
    if not uri or not str(uri).startswith("sqlite:///"):
        return None
    rest = str(uri)[len("sqlite:///"):].split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(rest)


def storage_file(url: str) -> Path | None:
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
    path = storage_file(url)
    where, fix = (("--storage", "leave --storage out to use the one the study ran with") if given else
                  ("the study's optuna.storage tag", "pass --storage with where that file is now"))
    if path is not None and not path.is_file():
        raise ReportError(f"no Optuna storage at {path} ({where} {url}); {fix}")
    problem = T.database_url_problem(url) if str(url).startswith("sqlite:") else None
    if problem:  # a file that is not a database: loading it would fail, and the report come out without trials
        raise ReportError(f"Optuna storage {url} ({where}): {problem}; {fix}")


def open_optuna_storage(url: str):
    """An RDB URL is passed through; a journal file (a path, or a ``journal:`` / ``file://`` prefix) is opened."""
    s = str(url)
    if "://" in s and not s.startswith("file://"):
        return s
    return JournalStorage(JournalFileBackend(re.sub(r"^(journal:|file://)", "", s)))


def run_hint(study_name: str, smoke: bool, known=()) -> str:
    """How to get runs for `study_name`: the studies/run.py command when the study exists (a
    `<study>-seeds-0-1` name: its `--seeds` command), else the close study / experiment names."""
    m = re.fullmatch(r"(.+)-seeds-(\d+(?:-\d+)*)", study_name)
    base, seeds = (m.group(1), " --seeds " + m.group(2).replace("-", " ")) if m else (study_name, "")
    names = sorted(p.stem for p in available_studies())
    if base in names:
        return f"run `python studies/run.py {base}{seeds}{' --smoke' if smoke else ''}` first"
    close = difflib.get_close_matches(study_name, sorted(set(names) | set(known)), n=3)
    return (f"there is no study {study_name!r} in studies/ "
            + (f"(did you mean {', '.join(close)}?)" if close else f"(studies: {', '.join(names)})"))


def _client(study_name: str, tracking_uri: str, smoke: bool):
    """An MLflow client of an existing store (reading never creates one) and the study's experiment."""
    db = _sqlite_file(tracking_uri)
    if db is not None and not db.is_file():  # MlflowClient would create an empty store there
        raise ReportError(f"no MLflow store at {db} (tracking URI {tracking_uri}); {run_hint(study_name, smoke)}; "
                          "or pass --tracking-uri / set MLFLOW_TRACKING_URI")
    problem = T.tracking_uri_problem(tracking_uri)
    if problem:
        raise ReportError(f"MLflow tracking URI {tracking_uri}: {problem}")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(f"{study_name}-smoke" if smoke else study_name)
    if exp is None:
        known = {e.name.removesuffix("-smoke") for e in client.search_experiments()}
        raise ReportError(f"no MLflow experiment {study_name + ('-smoke' if smoke else '')!r} at {tracking_uri}; "
                          f"{run_hint(study_name, smoke, known)}; or pass --tracking-uri")
    return client, exp


# ----- runs and trials ---------------------------------------------------------------------------------------

def _flatten_run(run) -> dict:
    info, d = run.info, run.data
    return {"run_id": info.run_id, "run_name": info.run_name, "status": info.status,
            "start_time": info.start_time, "end_time": info.end_time,
            "tags": dict(d.tags), "params": dict(d.params), "metrics": dict(d.metrics)}


def _parent_run(client, exp, study_name: str, notes: list[str], storage: str | None = None) -> dict:
    """The study's parent run; with `storage`, the one of the study in that Optuna storage (one study name in two
    storages has a parent run each, told apart by their `optuna.storage` tag)."""
    parents = [_flatten_run(r) for r in T.find_runs(client, exp.experiment_id,
                                                   {T.TAG_ROLE: "study", T.TAG_STUDY: study_name})]
    if not parents:
        raise ReportError(f"experiment {exp.name!r} at {client.tracking_uri} has no parent run tagged "
                          f"{T.TAG_ROLE}=study, {T.TAG_STUDY}={study_name}")
    if len(parents) > 1 and storage:
        mine = [p for p in parents if p["tags"].get(T.TAG_OPTUNA_STORAGE) == store_identity(storage)]
        parents = mine or parents
    if len(parents) > 1:
        notes.append(f"{len(parents)} parent runs found for this study; using the latest ({parents[-1]['run_id']}).")
    return parents[-1]


def _child_runs(client, exp, parent: dict, smoke: bool, notes: list[str]) -> list[dict]:
    """The parent's trial runs with the requested smoke flag."""
    want = "true" if smoke else "false"
    every = [_flatten_run(r) for r in T.find_runs(client, exp.experiment_id, {T.TAG_PARENT: parent["run_id"]})]
    children = [c for c in every if c["tags"].get(T.TAG_ROLE, "trial") == "trial"
                and str(c["tags"].get(T.TAG_SMOKE, "false")).lower() == want]
    if len(every) > len(children):
        notes.append(f"{len(every) - len(children)} child run(s) with {T.TAG_SMOKE} != {want} left out.")
    return children


def _flatten_trial(t) -> dict:
    row, seed = row_key(t)
    return {"number": t.number, "state": t.state.name, "values": t.values, "params": dict(t.params),
            "user_attrs": dict(t.user_attrs),
            "fail_reason": t.user_attrs.get("fail_reason") or t.system_attrs.get("fail_reason"),
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "row": row, "seed": seed,
            "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete}


TRIAL_COLUMNS = ["number", "state", "values", "params", "user_attrs", "fail_reason", "mlflow_run_id", "row", "seed",
                 "datetime_start", "datetime_complete"]


def _trials(study_name: str, parent: dict, storage: str | None, notes: list[str]):
    """(storage URL, Optuna study or None, flattened trials): the MLflow side alone still gives the tables."""
    url = storage or parent["tags"].get(T.TAG_OPTUNA_STORAGE) or T.default_optuna_storage()
    if not storage:
        check_storage(url, given=False)
    name = parent["tags"].get(T.TAG_OPTUNA_STUDY) or study_name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=open_optuna_storage(url))
        return url, study, [_flatten_trial(t) for t in study.get_trials(deepcopy=False)]
    except Exception as exc:  # noqa: BLE001 - any store problem: say so and report from MLflow alone
        if storage:  # named with --storage: a report without its trials is not what was asked for
            raise ReportError(f"Optuna study {name!r} could not be loaded from {url} (--storage): "
                              f"{' '.join(f'{type(exc).__name__}: {exc}'.split())}") from None
        notes.append(f"Optuna study {name!r} could not be loaded from {url}: {exc}")
        return url, None, []


# ----- what the report shows -------------------------------------------------------------------------------

def _primary_metric(spec: dict, runs: list[dict]) -> tuple[str, list[str], list[str]]:
    """(the report's metric, the objective's metrics, its directions): the first quality key the objective
    names (an `eval.metrics` name counts as its headline key), else the first headline key the runs logged."""
    obj = spec.get("objective") or {}
    names = obj.get("metric", obj.get("metrics", []))
    names = [names] if isinstance(names, str) else list(names or [])
    names = [METRICS[n].logged[0] if n in METRICS else n for n in names]
    dirs = obj.get("direction", obj.get("directions", []))
    dirs = [dirs] if isinstance(dirs, str) else list(dirs or [])
    metric = next((n for n in names if n in QUALITY_KEYS), None)
    logged = set().union(*[r["metrics"].keys() for r in runs]) if runs else set()
    metric = metric or next((n for n in HEADLINE_KEYS if n in logged), None)
    return metric or (names[0] if names else "objective"), names, dirs


def _shown_metric(metric: str, children: list[dict], notes: list[str]) -> str:
    """The study's metric, or the first quality key its finished runs logged when they logged not it (a smoke
    run computes a stand-in for FID)."""
    finished = [c for c in children if c["status"] == "FINISHED"]
    if not finished or any(metric in c["metrics"] for c in finished):
        return metric
    logged = [m for m in QUALITY_KEYS if any(m in c["metrics"] for c in finished)]
    if not logged:
        return metric
    why = uniq(c["tags"].get(f"{T.TAG_SMOKE_NOTE}metric.{metric}") for c in finished)
    notes.append(f"the study's metric `{metric}` was not logged by its runs" + (f" ({'; '.join(why)})" if why else "")
                 + f"; the tables show `{logged[0]}` instead.")
    return logged[0]


def _paper_dataset(spec: dict, paper: dict, children: list[dict]) -> tuple[str, str | None]:
    """(the paper's dataset the rows compare with, the dataset our teacher models)."""
    teachers = sorted({c["params"].get("teacher.name") for c in children if c["params"].get("teacher.name")})
    ours = teacher_dataset(teachers[0]) if teachers else None
    keyed = [paper["index"][r["paper_key"]] for r in spec.get("rows") or [] if r.get("paper_key") in paper["index"]]
    if keyed:
        return keyed[0]["dataset"], ours
    return ("imagenet64" if ours == "imagenet64" else "cifar10"), ours


def _lines(spec: dict, parent: dict, kind: str, children: list[dict], trials: list[dict], metric: str,
           paper: dict, paper_dataset: str, notes: list[str]) -> pd.DataFrame:
    """The report's table lines: the study file's rows, or (a search, or no file) one per trial."""
    if spec.get("rows"):
        known = {str(r.get("id", i)) for i, r in enumerate(spec["rows"])}
        skipped = skipped_rows(parent["tags"].get(T.TAG_SKIPPED_ROWS), {str(r.get("id")) for r in spec["rows"]})
        lines = row_lines(spec, children, trials, skipped, metric, paper, paper_dataset, kind)
        extra = [c for c in children if c["tags"].get(T.TAG_ROW) not in known]
        if extra:
            notes.append(f"{len(extra)} run(s) whose {T.TAG_ROW} is not in the study YAML are listed under 'Other runs'.")
    else:
        if kind != "search" and not spec:
            notes.append("study YAML not found: rows are the tracked runs in trial order, not the paper's order.")
        lines = trial_lines(children, trials, metric, paper, paper_dataset, kind)
    return pd.DataFrame(lines, dtype=object)  # object: None stays None (pandas 3 would make it NaN)


def _runs_frame(children: list[dict]) -> pd.DataFrame:
    columns = ["run_id", "row", "trial", "status", "error", "start_time", "end_time", "tags", "params", "metrics"]
    return pd.DataFrame([{"run_id": c["run_id"], "row": c["tags"].get(T.TAG_ROW), "trial": c.get("trial_number"),
                          "status": c["status"], "error": c["tags"].get(T.TAG_ERROR), "start_time": c["start_time"],
                          "end_time": c["end_time"], "tags": c["tags"], "params": c["params"],
                          "metrics": c["metrics"]} for c in children], columns=columns, dtype=object)


def load_study_data(study_name: str, *, storage: str | None = None, tracking_uri: str | None = None,
                    smoke: bool = False, spec: str | Path | dict | None = None,
                    artifact_dir: str | Path | None = None, paper_numbers: str | Path | None = None) -> StudyData:
    """Read the study from Optuna and its runs from MLflow into pandas (see the module docstring). Artifacts (the
    sample grids, a study file logged on the parent run) go to `artifact_dir`, else to a temporary folder that
    lives as long as the data."""
    spec_dict, spec_path = load_study_spec(study_name, spec)
    if storage:
        check_storage(storage, given=True)
    tracking_uri = tracking_uri or T.default_tracking_uri()
    client, exp = _client(study_name, tracking_uri, smoke)
    notes: list[str] = []
    parent = _parent_run(client, exp, study_name, notes, storage)
    scratch = None if artifact_dir else tempfile.TemporaryDirectory(prefix="sfd-report-")
    artifact_dir = artifact_dir or scratch.name
    if not spec_dict and spec is None:
        spec_dict, spec_path = _spec_from_parent(client, parent, artifact_dir)
        if spec_path:
            notes.append(f"study YAML read from the parent run ({spec_path}).")
    children = _child_runs(client, exp, parent, smoke, notes)
    kind = spec_dict.get("kind") or parent["tags"].get(T.TAG_KIND) or (
        "ablation" if any(T.TAG_ROW in c["tags"] for c in children) else "search")
    metric, objective_metrics, directions = _primary_metric(spec_dict, children)
    metric = _shown_metric(metric, children, notes)
    storage_url, optuna_study, trials = _trials(study_name, parent, storage, notes)
    number_of = {t["mlflow_run_id"]: t["number"] for t in trials if t["mlflow_run_id"]}
    for c in children:
        c["trial_number"] = number_of.get(c["run_id"], to_int(c["tags"].get(T.TAG_TRIAL)))
    paper = load_paper_numbers(paper_numbers)
    paper_dataset, our_dataset = _paper_dataset(spec_dict, paper, children)
    data = StudyData(
        study=study_name, kind=kind, smoke=smoke, spec=spec_dict, spec_path=spec_path, tracking_uri=tracking_uri,
        storage=storage_url, experiment_name=exp.name, experiment_id=exp.experiment_id, parent=parent,
        runs=_runs_frame(children), trials=pd.DataFrame(trials, columns=TRIAL_COLUMNS, dtype=object),
        rows=_lines(spec_dict, parent, kind, children, trials, metric, paper, paper_dataset, notes), metric=metric,
        objective_metrics=objective_metrics, directions=directions, paper=paper, paper_dataset=paper_dataset,
        comparable=(metric == "fid" and not smoke and our_dataset == paper_dataset), optuna_study=optuna_study,
        notes=notes, scratch=scratch)
    _fetch_histories_and_samples(data, client, children, artifact_dir)
    return data


def _fetch_histories_and_samples(data: StudyData, client, children: list[dict], artifact_dir) -> None:
    """The loss histories and sample grids of the runs the table shows (an SFD-v line at another NFE shows
    its row's run)."""
    by_id = {c["run_id"]: c for c in children}
    art_dir = Path(artifact_dir)
    for r in data.rows.to_dict("records") if len(data.rows) else []:
        if not r.get("run_id") or r.get("derived_from"):
            continue
        run = by_id[r["run_id"]]
        history = _loss_history(client, run)
        if not history.empty:
            data.histories[run["run_id"]] = history
        if "samples.png" in _artifact_names(client, run["run_id"]):
            dst = art_dir / slug(r["row_id"])
            dst.mkdir(parents=True, exist_ok=True)
            data.samples[run["run_id"]] = Path(client.download_artifacts(run["run_id"], "samples.png", str(dst)))


def _loss_history(client, run: dict) -> pd.DataFrame:
    """Per-student-step training losses (`train/loss_<loss>/step_<k>`, `loss/step_<k>` in runs logged before the
    loss was in the name) by iteration; the mean (`train/loss_<loss>`, `loss`) when the run logged no step
    (vanilla rows train one random step per iteration)."""
    metrics = run["metrics"]
    keys = sorted((k for k in metrics if re.fullmatch(r"(train/loss_\w+|loss)/step_\d+", k)),
                  key=lambda k: int(k.rsplit("_", 1)[1]))
    mean = [k for k in metrics if re.fullmatch(r"train/loss_\w+|loss", k)]
    keys = keys or mean[:1]
    return pd.DataFrame([{"key": k, "student_step": int(k.rsplit("_", 1)[1]) if "/step_" in k else "mean",
                          "step": m.step, "value": m.value}
                         for k in keys for m in client.get_metric_history(run["run_id"], k)])


def _artifact_names(client, run_id: str) -> set[str]:
    try:
        return {a.path for a in client.list_artifacts(run_id)}
    except Exception:  # noqa: BLE001 - an artifact store that cannot be listed: no samples to show
        return set()
