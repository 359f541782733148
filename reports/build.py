"""Rebuild the paper's tables from tracked runs: Optuna study + MLflow runs -> pandas -> report.

    python reports/build.py <study> [--out DIR] [--storage URL] [--tracking-uri URI] [--smoke]

writes into ``reports/out/<study>/`` (git-ignored):

* ``report.md``    header (teacher, device, samples, budgets, commit, metric), the study's table in the
                   paper's layout (ablation / comparison) or the best trials + parameter importances (search),
                   figures, and an auto-written reading of the results;
* ``figures/``     PNG + SVG: metric vs NFE, metric vs training device-hours (Pareto), loss curves per student
                   step, ours-vs-paper bars (ablation), importances + history (search), sample grids;
* ``report.ipynb`` generated with nbformat, executed headless with nbclient; its cells load the data again
                   from MLflow/Optuna through this module (``from reports import build as rb``);
                   ``report.html`` is its nbconvert export;

and logs all of it under ``report/`` on the study's parent MLflow run.

The code reads straight down through these modules, each importing only ones above it:

* ``reports/formatting.py``  how values are written (numbers, flags, run ids, display names), conversions;
* ``reports/paper.py``       the paper's numbers and which of them a row stands for;
* ``reports/rows.py``        which run each table line shows (the study's own `shown_trial` rule) and the line;
* ``reports/loading.py``     the study file, the stores, `StudyData`, `ReportError`, `load_study_data`;
* ``reports/tables.py``      the tables, the notes under them and their markdown;
* ``reports/header.py``      the report's header;
* ``reports/reading.py``     the auto-written reading of the results;
* ``reports/figures.py``     the figures (`make_figures`, `save_figures`, `figure_png`);
* ``reports/notebook.py``    ``report.md`` (`report_markdown`), the notebook, its execution and its HTML export;

and this file builds, publishes and logs a report (`build_report`) and is the CLI (`main`). It re-exports the names
the notebook's cells (and the tests) use as ``rb.X`` (``__all__``) and calls them through its own namespace.

Numbers come only from tracked runs; the "paper" columns come only from ``reports/paper_numbers.yaml``.
Rows that were not run, failed, or are still running are shown as such and never filled in. Smoke runs
(tag ``sfd.smoke=true``) are left out unless ``smoke=True``.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # no POSIX file locks (Windows): a killed build's stage folder stays until removed by hand
    fcntl = None

if not __package__:
    # run as a script (python reports/build.py): import `reports.*` from the repo root, and keep reports/ itself
    # off the path so its modules (paper, rows, tables, ...) cannot shadow installed packages
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        del sys.path[0]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from reports.figures import FIGURE_TITLES, figure_png, make_figures, save_figures
from reports.formatting import fmt_afs, fmt_delta, fmt_paper, fmt_tmin, fmt_value, slug
from reports.header import header_markdown
from reports.loading import REPO_ROOT, ReportError, StudyData, load_study_data, run_hint, spec_name
from reports.notebook import export_html, report_markdown, run_notebook, write_notebook
from reports.paper import PAPER_NUMBERS_PATH, load_paper_numbers
from reports.reading import reading_markdown
from reports.tables import ablation_table, comparison_table, frame_to_markdown, report_tables, table_notes
from sfd.signals import run_script
from sfd.tracking import TAG_REPORT, name_problem

# What the notebook's cells, studies/run.py and the tests use as `reports.build.X` (`rb.X`): the code lives in the
# modules above; build.py looks these names up in its own namespace, so patching `rb.X` takes effect here.
__all__ = [
    "DEFAULT_OUT_ROOT", "FIGURE_TITLES", "PAPER_NUMBERS_PATH", "REPORT_ENTRIES", "ReportError", "StudyData",
    "ablation_table", "build_report", "check_out_dir", "check_spec_name", "comparison_table", "export_html",
    "figure_png", "fmt_afs", "fmt_delta", "fmt_paper", "fmt_tmin", "fmt_value", "frame_to_markdown",
    "header_markdown", "load_paper_numbers", "load_study_data", "log_report", "main", "make_figures",
    "publish_report", "reading_markdown", "report_markdown", "report_tables", "run_hint", "run_notebook",
    "save_figures", "table_notes", "write_notebook",
]

DEFAULT_OUT_ROOT = REPO_ROOT / "reports" / "out"
# What a build writes into its folder; anything else there (a user's own files) is left alone.
REPORT_ENTRIES = ("report.md", "report.ipynb", "report.html", "study.yaml", "figures")
TABLES_DIR = "report/tables"  # on the parent run: the report's tables as MLflow tables


def log_report(data: StudyData, out_dir: str | Path) -> None:
    """Log the report's entries under ``report/`` on the study's parent run."""
    out_dir = Path(out_dir)
    client = MlflowClient(tracking_uri=data.tracking_uri)
    run_id = data.parent["run_id"]
    for name in REPORT_ENTRIES:
        path = out_dir / name
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=f"report/{name}")
        elif path.is_file():
            client.log_artifact(run_id, str(path), artifact_path="report")
    client.set_tag(run_id, TAG_REPORT, "report/report.md")
    log_tables(client, run_id, report_tables(data))


def log_tables(client, run_id: str, tables: dict[str, pd.DataFrame]) -> list[str]:
    """The report's tables as MLflow tables on the parent run (`report/tables/<title>.json`, MLflow's `log_table`
    format: pandas' split orientation), which the UI shows as tables and `mlflow.load_table` reads back. MLflow's
    `log_table` appends rows to a table that exists; a rebuilt report replaces it, written in the same format.
    Returns the artifact paths."""
    existing = {a.path for a in client.list_artifacts(run_id, TABLES_DIR)}
    paths = []
    for title, frame in tables.items():
        path = f"{TABLES_DIR}/{slug(title)}.json"
        if path in existing:
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / Path(path).name
                frame.to_json(local, orient="split", index=False, date_format="iso")
                client.log_artifact(run_id, str(local), TABLES_DIR)
        else:
            client.log_table(run_id, data=frame, artifact_file=path)
        paths.append(path)
    return paths


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


def _locked(folder: Path, *, wait: bool) -> int | None:
    """A file descriptor holding an exclusive OS lock on `folder`, or None when another process holds it (and not
    `wait`). The OS drops the lock when the process ends, however it ends (SIGKILL too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_stale_stages(parent: Path, prefix: str) -> None:
    """Remove the stage folders that killed builds left in `parent`: those whose lock no live build holds."""
    for old in parent.glob(glob.escape(prefix) + "*"):
        if not old.is_dir() or old.is_symlink():
            continue
        fd = _locked(old, wait=False)
        if fd is not None:  # no build owns it
            shutil.rmtree(old, ignore_errors=True)
            os.close(fd)


@contextlib.contextmanager
def building_stage(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out` to build the report in, removed when the build ends (a stop included). The
    build holds an OS lock on it, so a build that was killed (SIGKILL, a power cut) leaves a folder that the next
    build beside it removes, while the folder of a build still running stays. Stages are made and cleared under a
    lock on `out`'s parent folder, so no build can clear another's stage between its creation and its lock."""
    parent, prefix = out.parent, f".{out.name}-building-"
    parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as stage:
            yield Path(stage)
        return
    guard = _locked(parent, wait=True)
    try:
        _remove_stale_stages(parent, prefix)
        stage = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        held = _locked(stage, wait=True)
    finally:
        os.close(guard)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        os.close(held)


def _build_in(stage: Path, out: Path, data: StudyData, execute_notebook: bool) -> Exception | None:
    """Write every report entry into `stage` (to be moved to `out`); returns the notebook's execution error."""
    # the study definition the report was built against travels with it; the notebook finds it beside itself
    if data.spec:
        (stage / "study.yaml").write_text(yaml.safe_dump(data.spec, sort_keys=False))
    figures = save_figures(data, stage / "figures")
    (stage / "report.md").write_text(report_markdown(data, figures), encoding="utf-8")
    nb_path = write_notebook(data, stage / "report.ipynb", spec_ref="study.yaml" if data.spec else None,
                             report_dir=out)
    if not execute_notebook:
        return None
    try:
        run_notebook(nb_path, cwd=stage)  # a sibling of `out`: the notebook's relative paths hold in both
    except Exception as exc:  # noqa: BLE001 - the executed notebook shows the failing cell: keep it, then fail loudly
        error = exc
    else:
        error = None
    export_html(nb_path)
    return error


def check_out_dir(path: str | Path) -> None:
    """An output folder that cannot be made (a file there, or a file where one of its parents would go) is an
    error before anything is loaded or built, not a traceback once the report is ready to be moved in."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise ReportError(f"output folder {path} exists and is not a folder; pass --out a folder (it is created "
                          "if missing)")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ReportError(f"output folder {path} cannot be created: {parent} is not a folder; pass --out a "
                          "path under a folder")


def check_spec_name(study_name: str, spec: str | Path | dict | None) -> None:
    """A study YAML given explicitly must define this study: another study's YAML would put its description
    and rows into this study's report. (A `--seeds` study's YAML carries its `<study>-seeds-...` name.)"""
    if spec is None:
        return
    name, path = spec_name(study_name, spec)
    if name != study_name:
        raise ReportError(f"study YAML {path or '(given as a dict)'} defines study {name!r}, not {study_name!r}; "
                          f"pass {study_name}'s own YAML as --spec, or leave --spec out")


def build_report(study_name: str, *, storage: str | None = None, tracking_uri: str | None = None,
                 out_dir: str | Path | None = None, smoke: bool = False, execute_notebook: bool = True,
                 log_to_mlflow: bool = True, spec: str | Path | dict | None = None) -> Path:
    """Build report.md, figures/, report.ipynb (+ .html) for a study; returns the path of report.md.

    The report is built in a hidden folder beside `out_dir` and moved in only when complete, so a build
    that fails (a study that cannot be loaded, a figure that cannot be drawn) leaves an earlier report whole
    and creates no folder; a stop removes that folder, and one a killed build left goes with the next build
    (`building_stage`). A notebook that fails to execute is the exception: the report is published and
    logged with the failing cell's output, then the build fails loudly."""
    if name_problem(study_name):  # it names the report's folder
        raise ReportError(f"study: {name_problem(study_name)}")
    out = Path(out_dir) if out_dir else DEFAULT_OUT_ROOT / (f"{study_name}-smoke" if smoke else study_name)
    check_out_dir(out)
    check_spec_name(study_name, spec)
    with tempfile.TemporaryDirectory(prefix="sfd-report-art-") as art:
        data = load_study_data(study_name, storage=storage, tracking_uri=tracking_uri, smoke=smoke, spec=spec,
                               artifact_dir=art)
        with building_stage(out) as stage:
            error = _build_in(stage, out, data, execute_notebook)
            publish_report(stage, out)
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
    matplotlib.use("Agg")
    sys.exit(run_script(main))  # Ctrl-C / SIGTERM: the half-built report's folder goes, one line says why
