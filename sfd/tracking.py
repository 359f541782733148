"""MLflow, in one place: where runs are stored, how experiments, parent (study) and child (trial) runs are
found or created, and which params, metrics, tags and artifacts a run carries (the layout in the README's
"Tracking layout" section, read back by `reports/`).

The distillation core never imports this module: `RunLogger.iteration_callback` is handed to
`sfd.distill.distill` as its `callback`. Per-iteration metrics are buffered and written with one
`MlflowClient.log_batch` call every `every` iterations, not one store round trip per value.

Default store: ``sqlite:///<project>/runs/mlflow.db`` with artifacts under ``<project>/runs/artifacts``;
``MLFLOW_TRACKING_URI`` overrides it (and ``SFD_RUNS_DIR`` moves the default folder). An MLflow server
(``http://host:port``) keeps artifacts itself; a database store without one needs ``SFD_ARTIFACT_ROOT``.
"""
from __future__ import annotations

import functools
import getpass
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

# MLflow reads MLFLOW_DISABLE_TELEMETRY when it is imported: set the defaults before importing it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs / CI output
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" lines per run on a server

import psutil  # noqa: E402
import sqlalchemy  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag, ViewType  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # noqa: E402
from mlflow.utils.mlflow_tags import (MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER,  # noqa: E402
                                      MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME, MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME,
                                      MLFLOW_SOURCE_TYPE, MLFLOW_USER)

from sfd.signals import stops_deferred  # noqa: E402
from sfd.storelock import backend, sqlite_path, store_lock, without_password  # noqa: E402

# Tag names (the contract with reports/).
TAG_ROLE = "sfd.role"  # study | trial | run
TAG_STUDY = "sfd.study"
TAG_KIND = "sfd.kind"
TAG_TRIAL = "sfd.trial_number"
TAG_ROW = "sfd.row"
TAG_SMOKE = "sfd.smoke"
TAG_ERROR = "sfd.error"
TAG_DEVICE = "sfd.device"
TAG_THREADS = "sfd.threads"  # the CPU threads the run computed with (its `threads` setting resolved, sfd.threads)
TAG_SEED = "sfd.seed"
TAG_OVERRIDES = "sfd.overrides"  # a lone run's command-line overrides of its YAML (experiments/run.py)
TAG_ALGORITHM = "sfd.algorithm"
TAG_FIRST_STAGE = "sfd.first_stage"  # a second stage's first-stage reference (run id, folder, file)
TAG_FIRST_STAGE_ROW = "sfd.first_stage_row"  # ... and, in a study, the row it came from
TAG_EVALUATED_STUDENT = "sfd.evaluated_student"  # algorithm evaluate: the saved student it samples (run id, path)
TAG_EVALUATED_ROW = "sfd.evaluated_row"  # ... and, in a study, the row that trained it
# By the config key naming a saved student (sfd.config.SAVED_STUDENT_KEYS): its tag and its study-row tag.
SAVED_STUDENT_TAGS = {"second_stage.first_stage": (TAG_FIRST_STAGE, TAG_FIRST_STAGE_ROW),
                      "evaluate.student": (TAG_EVALUATED_STUDENT, TAG_EVALUATED_ROW)}
TAG_WORKER_DEVICE = "sfd.worker_device"
TAG_REPORT = "sfd.report"  # on a study's parent run: where its report artifact is
# Which process runs a run (not on a study's parent run, which peers share): a run still RUNNING whose process is
# gone is marked FAILED by the next start on that host (`fail_orphaned_runs`).
TAG_HOST = "sfd.host"
TAG_PID = "sfd.pid"
TAG_PID_START = "sfd.pid_start"  # the process's start time (epoch seconds), so a reused pid is not taken for it
# On a study's parent run: what the study optimises and how it was set up.
TAG_OBJECTIVE = "sfd.objective"
TAG_DIRECTIONS = "sfd.directions"
TAG_SAMPLER = "sfd.sampler"
TAG_SPEC_PATH = "sfd.spec_path"
TAG_DEVICES = "sfd.devices"
TAG_SKIPPED_ROWS = "sfd.skipped_rows"
# A smoke run's notes on what it replaced: `sfd.smoke.<what>` (e.g. sfd.smoke.metric.fid, sfd.smoke.loss.name).
TAG_SMOKE_NOTE = "sfd.smoke."
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"  # the description MLflow's UI shows
TAG_OPTUNA_STUDY = "optuna.study_name"
TAG_OPTUNA_STORAGE = "optuna.storage"
# Provenance on every run: the checkout's commit, whether it had local edits, and `version.<package>`.
TAG_GIT_COMMIT = "git.commit"
TAG_GIT_DIRTY = "git.dirty"
TAG_VERSION = "version."
# What MLflow's UI shows of a run's source (its "Source", "User" and commit columns).
SOURCE_TAGS = (MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER)
# An experiment tag: the experiment's type, "Machine learning" (the UI's ExperimentKind values), which MLflow 3 UIs
# without the sidebar's GenAI / Model training switch read to open its runs rather than the GenAI overview. MLflow
# 3.17's UI decides by that switch instead (URL `?workflowType=machine_learning`, remembered by the browser).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# The metric each trial logs its study's objective under (the first one; `objective_<i>` for the others) and the
# experiment tags that make it the experiment's primary metric.
OBJECTIVE_KEY = "objective"
TAG_PRIMARY_METRIC = MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME
TAG_PRIMARY_METRIC_GREATER_IS_BETTER = MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER

# Names that become folder and file names: MLflow experiments (artifacts/<experiment>/), studies (their lock, the
# YAML `--seeds` writes, reports/out/<study>/). One path component that is not hidden, short enough for every file
# name built from it (`.<study>-smoke-building-xxxxxxxx`, `<study>-smoke-<key>.lock`) to stay under 255 bytes.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_NAME_LENGTH = 128
DATASET_ATTEMPTS = 4  # log_inputs tries: runs logging the same dataset at once race on its row

MAX_BATCH_METRICS = 1000  # MLflow's limit per log_batch request
MAX_BATCH_PARAMS = 100
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 5000
ARTIFACT_ROOT_ENV = "SFD_ARTIFACT_ROOT"  # where a database store without a server keeps artifacts
SERVER_SCHEMES = ("http://", "https://")
SERVER_WAIT_S = 10.0  # how long a pre-flight check waits for an MLflow server or a database server to answer


# ----- where things live ----------------------------------------------------------------------------------

def project_root() -> Path:
    """The checkout holding the `sfd` package (when it has a pyproject.toml), else the working directory."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def runs_dir() -> Path:
    """``$SFD_RUNS_DIR`` or ``<project>/runs``: the default home of both stores (git-ignored)."""
    return Path(os.environ.get("SFD_RUNS_DIR") or project_root() / "runs").expanduser().resolve()


def _sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or _sqlite_uri(runs_dir() / "mlflow.db")


def default_optuna_storage() -> str:
    return _sqlite_uri(runs_dir() / "optuna.db")


def is_server(uri: str) -> bool:
    """An MLflow tracking server (it keeps the runs' artifacts itself when started with --artifacts-destination)."""
    return uri.startswith(SERVER_SCHEMES)


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def _first_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())


def local_store_problem(path: Path, kind: str) -> str | None:
    """Why a local store cannot be at `path` (kind "sqlite": a database file; "folder": an MLflow file store),
    else None. Reads at most 16 bytes and creates nothing: a folder, a device or a file of another kind there
    (`/etc/passwd`) would otherwise fail inside SQLAlchemy or MLflow, after a lock file or a folder was made."""
    path = path.expanduser()
    if not path.exists():
        parent = _first_existing(path.absolute().parent)
        return None if parent.is_dir() else f"{path} cannot be created: {parent} is not a folder"
    if kind == "folder":
        return None if path.is_dir() else f"{path} is not a folder (an MLflow file store is a folder)"
    if path.is_dir():
        return f"{path} is a folder; name a database file (in it, or a new one)"
    if not path.is_file():
        return f"{path} is not a regular file"
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if head and head != SQLITE_HEADER:  # an empty file is an empty database to SQLite
        return f"{path} is not an SQLite database (it starts with {head[:8]!r}); name a new file or a store"
    return None


def database_url_problem(url: str, connect: bool = False) -> str | None:
    """Why SQLAlchemy cannot use a database URL (unparsable, unknown dialect, driver not installed, a sqlite file
    that is not a database; with `connect` a database server that does not answer), else None. Creates no file:
    a sqlite file is never opened here beyond its first 16 bytes."""
    try:
        connect_args = {"connect_timeout": int(SERVER_WAIT_S)} if backend(url) == "postgresql" else {}
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
    except Exception as exc:  # noqa: BLE001 - ArgumentError, NoSuchModuleError, ImportError: all mean unusable
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    try:
        if connect and backend(url) != "sqlite":
            with engine.connect():
                pass
    except Exception as exc:  # noqa: BLE001 - OperationalError and the like: one line says why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"cannot connect to {without_password(url)}: {first}"
    finally:
        engine.dispose()
    path = sqlite_path(url)
    if path is not None and str(path).split("?", 1)[0] not in ("", ":memory:"):
        return local_store_problem(Path(str(path).split("?", 1)[0]), "sqlite")
    return None


def server_problem(uri: str) -> str | None:
    """Why no MLflow server answers at `uri` (its /health endpoint), else None."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_WAIT_S) as reply:
            if reply.status == 200:
                return None
            return f"no MLflow server answers at {uri} (GET /health: HTTP {reply.status})"
    except (OSError, ValueError) as exc:  # URLError, refused, timed out, a malformed address
        return (f"no MLflow server answers at {uri} ({getattr(exc, 'reason', exc)}); start it first (README: Many "
                "machines)")


def tracking_uri_problem(uri: str, connect: bool = False) -> str | None:
    """Why MLflow cannot use a tracking URI (an unknown scheme, a database driver not installed, a local store
    that cannot be one, a database store without a server and no shared artifact root; with `connect` a server or
    database that does not answer), else None. Creates nothing."""
    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception as exc:  # noqa: BLE001 - MLflow's error names the schemes it supports
        supported = re.search(r"Supported URI schemes are: (\[[^]]*\])", str(exc))
        return "MLflow has no store for this scheme" + (f"; it supports {supported.group(1)}" if supported else
                                                        f" ({type(exc).__name__})")
    if is_server(uri):
        return server_problem(uri) if connect else None
    if backend(uri) not in (None, "sqlite") and not os.environ.get(ARTIFACT_ROOT_ENV):
        return (f"a {backend(uri)} store without an MLflow server keeps artifacts (each run's student) where "
                f"{ARTIFACT_ROOT_ENV} says: set it to a folder or URI every machine sees, or run `mlflow server "
                "--artifacts-destination DIR` and pass its http:// address")
    if backend(uri) is not None:
        return database_url_problem(uri, connect)
    if uri.startswith("file:") or "://" not in uri:  # MLflow's file store: a folder
        return local_store_problem(Path(uri.removeprefix("file://").removeprefix("file:")), "folder")
    return None


def name_problem(name: Any) -> str | None:
    """Why `name` cannot name an experiment or a study (it becomes a folder or file name), else None."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        return (f"got {name!r}; letters, digits, '_', '.' and '-' only, starting with a letter or digit (it names "
                "folders and files, so no '/' and no '..')")
    if len(name) > MAX_NAME_LENGTH:
        return f"got a name of {len(name)} characters; at most {MAX_NAME_LENGTH} (it names folders and files)"
    return None


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """A run's page in the MLflow UI when the tracking URI is a server (http or https), else None. The page is
    where MLflow's own client points when a run ends (`{server}/#/experiments/{id}/runs/{run id}`)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ensure_sqlite_parent(uri: str) -> None:
    """Create the folder of a sqlite URI's file (sqlite creates the file, not its folder)."""
    path = sqlite_path(uri)
    if path is not None:
        path.expanduser().parent.mkdir(parents=True, exist_ok=True)


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go. An MLflow server chooses (None: with --artifacts-destination they go
    through it, as mlflow-artifacts:/ URIs any machine can read); else ``$SFD_ARTIFACT_ROOT/<experiment>`` when
    set; else beside a local store: ``<store folder>/artifacts/<experiment>``. The experiment keeps the location
    its first run gave it. An experiment name that would lead anywhere else (`../x`) is a ValueError: whatever
    the name, nothing is written outside that folder."""
    if is_server(tracking_uri):
        return None
    root = os.environ.get(ARTIFACT_ROOT_ENV)
    path = sqlite_path(tracking_uri)
    if root and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", root):  # a URI (s3://, gs://, file://)
        if experiment in (".", "..") or "/" in experiment:
            raise ValueError(f"experiment name {experiment!r} would put its artifacts outside {root}")
        return f"{root.rstrip('/')}/{experiment}"
    if root:
        home = Path(root).expanduser().resolve()
    elif path is not None:
        home = (path.expanduser().parent / "artifacts").resolve()
    elif tracking_uri.startswith("file:") or "://" not in tracking_uri:
        home = (Path(tracking_uri.removeprefix("file://").removeprefix("file:")).expanduser() / "artifacts").resolve()
    else:
        return None
    location = (home / experiment).resolve()
    if location.parent != home:
        raise ValueError(f"experiment name {experiment!r} would put its artifacts at {location}, outside {home}")
    return location.as_uri()


@functools.lru_cache(maxsize=None)
def _quiet_migrations() -> None:
    # A fresh sqlite store runs its schema migrations and logs every one at INFO.
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _StopSafeClient:
    """An MlflowClient whose every call completes before a Ctrl-C or SIGTERM is acted on
    (`sfd.signals.stops_deferred`), so the run can still be ended KILLED after the stop."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        value = getattr(self._client, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            with stops_deferred():
                return value(*args, **kwargs)

        return call


@functools.lru_cache(maxsize=None)
def _open_store(uri: str) -> None:
    """Create (or migrate) the store at `uri` once per process, one process at a time (`storelock.store_lock`):
    MLflow runs its schema migrations when a client first opens a new database, and two processes doing so at
    once crash ("table ... already exists") or leave it half-migrated."""
    with store_lock(uri, "mlflow-schema"):
        MlflowClient(tracking_uri=uri)


def get_client(tracking_uri: str | None = None):
    _quiet_migrations()
    uri = tracking_uri or default_tracking_uri()
    ensure_sqlite_parent(uri)
    _open_store(uri)
    return _StopSafeClient(MlflowClient(tracking_uri=uri))


def get_or_create_experiment(client, name: str) -> str:
    """The experiment's id, creating it (with artifacts where `artifact_location` says, and tagged as a
    model-training experiment so the UI opens its runs) when absent, also when another process creates it at the
    same moment; a deleted experiment of that name is restored."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name),
                                            tags={TAG_EXPERIMENT_KIND: MODEL_TRAINING_KIND})
        except MlflowException:  # created meanwhile by another process (the name is unique)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if TAG_EXPERIMENT_KIND not in exp.tags:  # made before the kind was set
        client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING_KIND)
    return exp.experiment_id


def train_loss_key(loss_name: str) -> str:
    """The metric a run's training loss is logged under: `train/loss_<loss>` (e.g. train/loss_l1), so that runs
    trained with different losses, whose values cannot be compared, never share a training-loss metric; its
    value at student step k is `<key>/step_<k>`."""
    return f"train/loss_{loss_name}"


# ----- provenance --------------------------------------------------------------------------------------

def git_info(root: Path | None = None) -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` (tracked files modified) of the project checkout, or 'unknown'."""
    root = root or project_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {TAG_GIT_COMMIT: commit, TAG_GIT_DIRTY: str(bool(status.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {TAG_GIT_COMMIT: "unknown", TAG_GIT_DIRTY: "unknown"}


def package_versions() -> dict[str, str]:
    out = {f"{TAG_VERSION}python": platform.python_version()}
    for dist in ("sfd", "torch", "numpy", "mlflow", "optuna"):
        try:
            out[f"{TAG_VERSION}{dist}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[f"{TAG_VERSION}{dist}"] = "not installed"
    return out


def device_description(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


def source_tags(git: Mapping[str, str]) -> dict[str, str]:
    """MLflow's own source tags: the commit (from `git_info`), the entry point (the script or `python -m` module
    that runs, relative to the project when inside it), LOCAL, and the user."""
    entry = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if entry is None or not entry.is_file():
        name = "python"
    else:
        name = str(entry.relative_to(project_root())) if entry.is_relative_to(project_root()) else str(entry)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return {MLFLOW_GIT_COMMIT: git[TAG_GIT_COMMIT], MLFLOW_SOURCE_NAME: name, MLFLOW_SOURCE_TYPE: "LOCAL",
            MLFLOW_USER: user}


def provenance_tags() -> dict[str, str]:
    git = git_info()
    return {**git, **source_tags(git), **package_versions()}


def process_tags() -> dict[str, str]:
    """This process: host, pid and start time (a run left RUNNING by a process that is gone is found by them)."""
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
            TAG_PID_START: f"{psutil.Process().create_time():.2f}"}


def process_gone(pid: int, started: float | None) -> bool:
    """Whether the process `pid` (started at `started`, epoch seconds, if known) no longer runs on this host."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return started is not None and abs(process.create_time() - started) > 1.0  # the pid was reused
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # not ours to inspect: it exists
        return False


# ----- runs ----------------------------------------------------------------------------------------------

def _now_ms() -> int:
    return int(time.time() * 1000)


def _param_value(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text[:MAX_PARAM_LENGTH]


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _quoted(value: str) -> str:
    """A filter-string literal: single quotes, or double quotes for a value that holds a single quote."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"a tag value with both quote characters cannot be searched for in MLflow: {value!r}")


def find_runs(client, experiment_id: str, tags: Mapping[str, str], *, page_size: int = 1000,
              status: str | None = None) -> list:
    """All runs of an experiment whose tags equal `tags` (and with `status`, if given), oldest first, read page by
    page (a study may have more children than one page holds)."""
    clauses = [f"tags.`{k}` = {_quoted(str(v))}" for k, v in tags.items()]
    if status is not None:
        clauses.append(f"attributes.status = '{status}'")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=" and ".join(clauses), max_results=page_size,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def mark_failed(client, run_id: str, reason: str) -> None:
    """End a run as FAILED with `sfd.error` = reason."""
    client.set_tag(run_id, TAG_ERROR, reason[:MAX_TAG_LENGTH])
    client.set_terminated(run_id, status="FAILED")


class RunLogger:
    """One MLflow run: params, buffered per-iteration metrics, final metrics, artifacts, status.

    Used as a context manager: a clean exit ends the run FINISHED; an exception ends it FAILED with the
    error in tag `sfd.error` and the traceback as artifact `error.txt`, and propagates.
    """

    active = True  # writes to MLflow (a `SilentRunLogger` does not)

    def __init__(self, client, run_id: str, *, every: int = 50):
        self.client = client
        self.run_id = run_id
        self.every = max(1, int(every))
        self._pending: list = []  # IterationStats not yet written
        self.history: dict[str, list[tuple[int, float]]] = {}  # every per-iteration value written, on the host
        self.ended = False

    # -- params, tags, metrics
    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for chunk in _chunks(items, MAX_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_BATCH_PARAMS):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        ts = _now_ms()
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for chunk in _chunks(items, MAX_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=chunk)

    # -- per-iteration metrics from the distillation loop
    def iteration_callback(self, *, afs: bool, loss: str, per_step: bool = True) -> Callable:
        """A `callback` for `sfd.distill.distill`. Each iteration logs the mean over trained steps of the training
        loss named `loss` (under `train_loss_key(loss)`, e.g. train/loss_l1), its value per student step
        `<key>/step_<k>` (k = index of the student step along its grid; the AFS step 0 has no loss) when
        `per_step`, `lr`, `kimg`, `time/teacher_s`, `time/student_s`. Values stay on the device until a
        flush, every `self.every` iterations, which syncs once and writes one batch."""
        first = 1 if afs else 0
        key = train_loss_key(loss)

        def callback(stats) -> None:
            self._pending.append((stats, first, per_step, key, _now_ms()))
            if len(self._pending) >= self.every:
                self.flush()

        return callback

    def flush(self) -> None:
        if not self._pending:
            return
        # One host transfer for the whole window.
        flat = torch.cat([s.step_losses.reshape(-1).float() for s, *_ in self._pending]).tolist()
        metrics, i = [], 0
        for stats, first, per_step, loss_key, ts in self._pending:
            n = stats.step_losses.numel()
            losses, i = flat[i:i + n], i + n
            values = {loss_key: sum(losses) / max(n, 1), "lr": stats.lr, "kimg": stats.kimg,
                      "time/teacher_s": stats.teacher_seconds, "time/student_s": stats.student_seconds}
            if per_step:
                steps = stats.step_indices or range(first, first + n)
                values.update({f"{loss_key}/step_{k}": v for k, v in zip(steps, losses)})
            for key, value in values.items():
                metrics.append(Metric(key, float(value), ts, stats.iteration))
                self.history.setdefault(key, []).append((stats.iteration, float(value)))
        self._pending = []
        for chunk in _chunks(metrics, MAX_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_inputs(self, datasets: list) -> None:
        """MLflow dataset inputs (`mlflow.entities.DatasetInput`): the files the run reads, with their digests.
        Runs of one experiment log the same dataset; two logging it at once race on its row (UNIQUE constraint on
        experiment, name and digest: the loser's insert fails), so a failed call is tried again, which then finds
        the row the other made."""
        if not datasets:
            return
        for attempt in range(DATASET_ATTEMPTS):
            try:
                self.client.log_inputs(self.run_id, datasets=datasets)
                return
            except MlflowException:
                if attempt == DATASET_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    # -- artifacts
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image as PNG (written directly, without MLflow's image-logging extras)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            image.save(path)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def log_image_step(self, image, step: int, key: str = "samples") -> None:
        """A PIL image as step `step` of the run's image history `key` (the UI's image slider)."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file, save_kwargs={"dpi": 120, "bbox_inches": "tight"})

    # -- end
    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        if self.ended:
            return
        try:
            self.flush()
        finally:
            if error is not None:
                self.client.set_tag(self.run_id, TAG_ERROR, error[:MAX_TAG_LENGTH])
            self.client.set_terminated(self.run_id, status=status)
            self.ended = True

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
            return False
        reason = f"{exc_type.__name__}: {exc}"
        try:  # the buffered iterations are still written by end(): a diverging loss shows in its curve
            self.log_text("".join(traceback.format_exception(exc_type, exc, tb)), "error.txt")
        except Exception:  # noqa: BLE001 - logging the traceback must not hide the original error
            pass
        # Ctrl-C, or SIGTERM turned into sfd.signals.Terminated (a KeyboardInterrupt): stopped, not broken
        try:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED", error=reason)
        except Exception as end_exc:  # noqa: BLE001 - the original error is the one to propagate
            print(f"note: could not end MLflow run {self.run_id} ({type(end_exc).__name__}: {end_exc}); it stays "
                  "RUNNING until the next start on this host marks it failed", file=sys.stderr)
        return False


class Tracker:
    """Where a run is logged: the experiment, an optional parent run and tags every run gets.

    `on_start(run_id)` is called as soon as the run exists (a study uses it to link the Optuna trial
    before any work is done, so even a crashed trial points at its run).
    """

    def __init__(self, experiment: str = "experiments", *, tracking_uri: str | None = None,
                 parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None,
                 on_start: Callable[[str], None] | None = None, objective: list[str] | None = None,
                 run_name: str | None = None):
        self.experiment = experiment
        self.run_name = run_name  # names the run instead of the name `start_run` is given (a study's row id)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.parent_run_id = parent_run_id
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.on_start = on_start
        self.objective = list(objective or [])  # metric names whose values are logged as `objective`
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = get_client(self.tracking_uri)
        return self._client

    def start_run(self, run_name: str, *, tags: Mapping[str, Any] | None = None, every: int = 50) -> RunLogger:
        client = self.client
        exp_id = get_or_create_experiment(client, self.experiment)
        all_tags = {TAG_ROLE: "trial" if self.parent_run_id else "run", **provenance_tags(), **process_tags(),
                    **self.tags, **{k: str(v) for k, v in (tags or {}).items()}}
        if self.parent_run_id:
            all_tags[TAG_PARENT] = self.parent_run_id
        run = client.create_run(exp_id, run_name=self.run_name or run_name, tags=all_tags)
        logger = RunLogger(client, run.info.run_id, every=every)
        if self.on_start is not None:
            try:
                self.on_start(run.info.run_id)
            except BaseException as exc:  # Ctrl-C / SIGTERM included: the caller never got the run to end it
                logger.__exit__(type(exc), exc, exc.__traceback__)
                raise
        return logger


class SilentRunLogger:
    """A `RunLogger` that writes nothing: what the ranks other than 0 of a DDP run log through (rank 0 alone
    talks to MLflow). Its iteration callback is None, so the training loop skips it."""

    active = False
    run_id = None

    def __init__(self):
        self.history: dict[str, list[tuple[int, float]]] = {}

    def _nothing(self, *args, **kwargs) -> None:
        return None

    log_params = set_tags = log_metrics = log_inputs = iteration_callback = flush = _nothing
    log_artifact = log_text = log_image = log_image_step = log_figure = end = _nothing

    def __enter__(self) -> "SilentRunLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False


class SilentTracker:
    """A `Tracker` for a rank other than 0: the same settings (objective, tracking URI for reading a first
    stage), but its runs are `SilentRunLogger`s."""

    def __init__(self, tracker: Tracker):
        self.experiment = tracker.experiment
        self.tracking_uri = tracker.tracking_uri
        self.parent_run_id = tracker.parent_run_id
        self.objective = list(tracker.objective)

    def start_run(self, run_name: str, *, tags: Mapping[str, Any] | None = None, every: int = 50) -> SilentRunLogger:
        return SilentRunLogger()


# ----- study (parent) runs -------------------------------------------------------------------------------

def study_parent_run(client, experiment: str, study: str, tags: Mapping[str, str], run_id: str | None = None) -> str:
    """The study's one parent run: `run_id` (the one its Optuna study recorded) when that is this study's parent
    run in this experiment, set RUNNING again with `tags`; else a new one. Never found by name: two studies of one
    name in two Optuna storages share an MLflow store without sharing a parent."""
    exp_id = get_or_create_experiment(client, experiment)
    if run_id is not None:
        try:
            known = client.get_run(run_id)
        except MlflowException:  # not in this store (the study was run against another tracking URI)
            known = None
        if known is not None and known.info.experiment_id == exp_id and known.data.tags.get(TAG_STUDY) == study:
            client.update_run(run_id, status="RUNNING")
            for key, value in tags.items():
                client.set_tag(run_id, key, str(value))
            return run_id
    run = client.create_run(exp_id, run_name=study,
                            tags={TAG_ROLE: "study", TAG_STUDY: study, **provenance_tags(), **tags})
    return run.info.run_id


def trial_runs(client, experiment_id: str, parent_run_id: str, trial_number: int) -> list:
    """A study trial's runs, oldest first, found by the tags every trial's run is created with (its parent and its
    trial number), so a run is found even when its process died before the trial recorded its id."""
    return find_runs(client, experiment_id, {TAG_PARENT: parent_run_id, TAG_TRIAL: str(trial_number)})


def fail_orphaned_runs(client) -> list[str]:
    """Runs still RUNNING that a process on this host started and that process is gone (SIGKILL, a crash, a
    reboot): end them FAILED saying so. A study's parent run (shared by peers) carries no process and is left
    alone. Returns their ids."""
    host = socket.gethostname()
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    failed = []
    for chunk in _chunks(ids, 100):
        runs = client.search_runs(chunk, filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = "
                                  f"{_quoted(host)}", max_results=1000)
        for run in runs:
            pid, started = run.data.tags.get(TAG_PID), run.data.tags.get(TAG_PID_START)
            if pid and process_gone(int(pid), float(started) if started else None):
                mark_failed(client, run.info.run_id, f"interrupted: its process is gone (pid {pid} on {host} "
                            "ended without ending the run: killed, or the machine stopped)")
                failed.append(run.info.run_id)
    return failed


__all__ = [
    "RunLogger", "Tracker", "SilentRunLogger", "SilentTracker", "default_tracking_uri", "default_optuna_storage", "runs_dir", "project_root",
    "get_client", "get_or_create_experiment", "git_info", "package_versions", "device_description",
    "find_runs", "mark_failed", "study_parent_run", "trial_runs", "fail_orphaned_runs", "tracking_uri_problem",
    "database_url_problem", "is_server", "artifact_location", "process_tags", "local_store_problem", "run_url",
    "name_problem",
]
