"""The report's documents: ``report.md`` (`report_markdown`), the notebook (`write_notebook`), its headless
execution on this interpreter's kernel (`run_notebook`) and its HTML export (`export_html`).

The notebook is portable: it names no path of the machine that built it. Its cells find the checkout and the
stores by paths relative to the notebook's own folder (where Jupyter runs a notebook), or from the environment
(`SFD_REPO`, `SFD_REPORT_TRACKING_URI`, `SFD_REPORT_STORAGE`) when it is read somewhere else. It opens with the
narrative and the tables (their code cells collapsed), then the figures and the data; warnings are silenced.

Part of the report builder (``reports/build.py``); imports ``reports.loading``, ``reports.tables``,
``reports.header``, ``reports.reading`` and ``reports.figures``. The notebook's cells import ``reports.build``,
which re-exports what they call."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbconvert import HTMLExporter
from nbformat import v4
from traitlets.config import Config

from reports.figures import FIGURE_TITLES
from reports.header import header_markdown
from reports.loading import REPO_ROOT, StudyData, storage_file
from reports.reading import reading_markdown
from reports.tables import frame_to_markdown, other_runs_table, param_importances, report_tables, table_notes

HIDE_INPUT = "hide-input"  # the tag of a cell whose code is collapsed in Jupyter and left out of the html
ENVIRONMENT = {"repo": "SFD_REPO", "tracking_uri": "SFD_REPORT_TRACKING_URI", "storage": "SFD_REPORT_STORAGE"}


def _collapsed() -> dict:
    return {"jupyter": {"source_hidden": True}, "tags": [HIDE_INPUT]}


def report_markdown(data: StudyData, figures: dict[str, Path] | None = None, fig_rel: str = "figures") -> str:
    parts = [header_markdown(data)]
    for title, df in report_tables(data).items():
        parts.append(f"## {title}\n\n{frame_to_markdown(df)}")
    if data.kind == "search":
        imp, why = param_importances(data)
        if imp.empty:
            parts.append(f"_Parameter importances: {why}._\n")
    notes = table_notes(data)
    if notes:
        parts.append(notes)
    if figures:
        parts.append("## Figures\n\n" + "\n\n".join(
            f"### {FIGURE_TITLES.get(n, n)}\n\n![{n}]({fig_rel}/{n}.png)" for n in figures) + "\n")
    parts.append(reading_markdown(data))
    runs_tbl = other_runs_table(data)
    if not runs_tbl.empty:
        parts.append("## All tracked runs (every attempt)\n\n" + frame_to_markdown(runs_tbl))
    return "\n".join(parts)


# ----- the notebook ----------------------------------------------------------------------------------------------

def _located(uri: str | None, report_dir: Path) -> str:
    """Python source for a store in the notebook's cells: a local file's path relative to the notebook's
    folder (as a sqlite URL for a sqlite file), anything else (a server) as it is."""
    path = storage_file(uri) if uri else None
    if path is None:
        return repr(uri)
    rel = os.path.relpath(path.resolve(), report_dir.resolve())
    return f"'sqlite:///' + here({rel!r})" if str(uri).startswith("sqlite:") else f"here({rel!r})"


def _setup_source(data: StudyData, report_dir: Path, spec_ref: str | None) -> str:
    repo = os.path.relpath(REPO_ROOT, report_dir.resolve())
    return (
        "import os, sys, warnings\n"
        "warnings.filterwarnings('ignore')  # library warnings (tqdm, MLflow, Optuna) are noise in a report\n"
        "os.environ.setdefault('MLFLOW_DISABLE_TELEMETRY', 'true')\n"
        "HERE = os.getcwd()  # Jupyter runs a notebook in its own folder: the paths below are relative to it\n"
        "def here(path):\n    return os.path.normpath(os.path.join(HERE, path))\n"
        f"REPO = os.environ.get({ENVIRONMENT['repo']!r}) or here({repo!r})\n"
        "if REPO not in sys.path:\n    sys.path.insert(0, REPO)\n"
        f"STUDY = {data.study!r}\n"
        f"TRACKING_URI = os.environ.get({ENVIRONMENT['tracking_uri']!r}) or {_located(data.tracking_uri, report_dir)}\n"
        f"STORAGE = os.environ.get({ENVIRONMENT['storage']!r}) or {_located(data.storage, report_dir)}\n"
        f"SMOKE = {data.smoke!r}\n"
        f"SPEC = {spec_ref!r}  # the study file the report was built against, beside this notebook\n"
        "from IPython.display import Image, Markdown, display\n"
        "from reports import build as rb\n"
        "print('kernel interpreter:', sys.executable)\n"
        "data = rb.load_study_data(STUDY, storage=STORAGE, tracking_uri=TRACKING_URI, smoke=SMOKE, spec=SPEC)\n"
        "display(Markdown(rb.header_markdown(data)))")


def write_notebook(data: StudyData, path: str | Path, *, spec_ref: str | None,
                   report_dir: str | Path | None = None) -> Path:
    """A notebook whose cells reload the study from MLflow/Optuna (no baked-in numbers). `report_dir`: the
    folder the notebook will be read in (default: its own), which its relative paths start from."""
    path = Path(path)
    report_dir = Path(report_dir) if report_dir else path.parent
    nb = v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [
        v4.new_markdown_cell(
            f"# Study report: `{data.study}`\n\nGenerated by `reports/build.py`. Every number below is read from "
            "the MLflow runs and the Optuna study when the notebook runs; the paper's numbers come from "
            "`reports/paper_numbers.yaml`. Re-run all cells to refresh. The checkout and the stores are found "
            "relative to this notebook's folder; to read them from elsewhere, set "
            + ", ".join(f"`{v}`" for v in ENVIRONMENT.values()) + ". The code is in the collapsed cells."),
        v4.new_code_cell(_setup_source(data, report_dir, spec_ref), metadata=_collapsed()),
        v4.new_code_cell(
            "for title, df in rb.report_tables(data).items():\n"
            "    display(Markdown(f'## {title}\\n\\n' + rb.frame_to_markdown(df)))\n"
            "display(Markdown(rb.table_notes(data)))", metadata=_collapsed()),
        v4.new_code_cell("display(Markdown(rb.reading_markdown(data)))", metadata=_collapsed()),
        v4.new_markdown_cell("## Figures"),
        v4.new_code_cell(
            "for name, fig in rb.make_figures(data).items():\n"
            "    display(Markdown(f'### {rb.FIGURE_TITLES.get(name, name)}'))\n"
            "    display(Image(data=rb.figure_png(fig)))", metadata=_collapsed()),
        v4.new_markdown_cell("## The rows as loaded (pandas)"),
        v4.new_code_cell(
            "cols = ['row_id', 'method', 'teacher', 't_min', 'afs', 'loss', 'nfe', 'status', 'reason', 'value',\n"
            "        'value_sd', 'n_seeds', 'paper_value', 'device_hours', 'run_id', 'trial_number']\n"
            "data.rows[[c for c in cols if c in data.rows.columns]]"),
    ]
    nbformat.write(nb, str(path))
    return path


def _kernel_manager(tmp: Path):
    """A kernel that runs on THIS interpreter (the venv's ipykernel), whatever kernelspecs the user has."""
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
    """Execute in place, headless (nbclient); the notebook is saved with its outputs even when a cell fails.

    nbclient runs in a thread of its own: in the main thread it takes SIGINT and SIGTERM over while it executes (a
    stop then only shuts the kernel down, the running cell fails, and the build went on to publish the report)
    and leaves Python's default handlers behind. Here the caller's handlers stay: a stop is raised in the caller
    as anywhere else, once the kernel is shut down."""
    path = Path(path)
    nb = nbformat.read(str(path), as_version=4)
    with tempfile.TemporaryDirectory(prefix="sfd-kernel-") as tmp:
        km = _kernel_manager(Path(tmp))
        client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(cwd or path.parent)}})
        failure: list[BaseException] = []

        def execute() -> None:
            try:
                client.execute(cleanup_kc=True)  # we pass the manager, so ask nbclient to shut the kernel down now
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
                failure.append(exc)

        worker = threading.Thread(target=execute, name="report-notebook", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.1)  # wakes for a stop signal, which is raised here
        except BaseException:
            with contextlib.suppress(Exception):
                km.shutdown_kernel(now=True)
            worker.join(10)
            raise
        finally:
            nbformat.write(nb, str(path))
        if failure:
            raise failure[0]
    return path


def export_html(nb_path: str | Path) -> Path:
    """The executed notebook as HTML, without the code of its collapsed cells."""
    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_input_tags = {HIDE_INPUT}
    nb_path = Path(nb_path)
    body, _ = HTMLExporter(config=config).from_notebook_node(nbformat.read(str(nb_path), as_version=4))
    out = nb_path.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out
