"""reports/build.py against tiny finished studies that this file lays out itself, exactly as the shared
contract says a study runner does (parent run + child runs by tags, params, metrics, histories, artifacts,
Optuna trials cross-linked by the `mlflow_run_id` user attribute). It does not use the study runner.

One notebook execution in the whole file (the ablation study); the comparison and search studies build
without executing their notebooks."""
from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import dataclasses
import math
import re
import struct
import sys
import zlib
from pathlib import Path

import pytest
import yaml

mlflow = pytest.importorskip("mlflow")
optuna = pytest.importorskip("optuna")
import pandas as pd  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `reports` lives at the repo root, not in sfd
from reports import build as rb  # noqa: E402

PAPER = yaml.safe_load(open(rb.PAPER_NUMBERS_PATH))
PAPER_BY_KEY = {r["key"]: r for r in PAPER["ablation"]["rows"]}
for _ds, _rows in PAPER["comparison"].items():
    PAPER_BY_KEY.update({r["key"]: r for r in _rows})


# ---------------------------------------------------------------------------------------------------------
# Laying out a finished study the way the contract says
# ---------------------------------------------------------------------------------------------------------

def _png(path: Path, w: int = 16, h: int = 16) -> Path:
    """A tiny grey-gradient PNG written without any imaging library."""
    raw = b"".join(b"\x00" + bytes((x * 255 // (w - 1) + y) % 256 for x in range(w)) for y in range(h))
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


class Layout:
    """Writes one study into a temporary MLflow store + Optuna storage."""

    def __init__(self, store: dict, study: str, kind: str, spec: dict, smoke: bool = False, directions=("minimize",)):
        tmp = store["tmp"]
        self.tmp, self.study, self.kind, self.smoke = tmp, study, kind, smoke
        self.tracking_uri, self.storage = store["tracking_uri"], store["storage"]
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = f"{study}-smoke" if smoke else study
        self.exp_id = self.client.create_experiment(exp, artifact_location=(tmp / "artifacts" / exp).as_uri())
        self.parent = self.client.create_run(self.exp_id, run_name=study, tags={
            "sfd.role": "study", "sfd.study": study, "sfd.kind": kind, "optuna.study_name": study,
            "optuna.storage": self.storage, "sfd.smoke": str(smoke).lower()}).info.run_id
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.ostudy = optuna.create_study(study_name=study, storage=self.storage, directions=list(directions))
        self.spec = spec

    def run(self, *, row: str | None, params: dict, metrics: dict | None, status: str = "FINISHED",
            error: str | None = None, trial_state=optuna.trial.TrialState.COMPLETE, history_steps=(0, 1, 2),
            samples: bool = True, smoke: bool | None = None, trial_params: dict | None = None,
            values: list | None = None, link_trial: bool = True) -> str:
        smoke = self.smoke if smoke is None else smoke
        n = len(self.ostudy.trials)
        tags = {"mlflow.parentRunId": self.parent, "sfd.role": "trial", "sfd.study": self.study,
                "sfd.trial_number": str(n), "sfd.smoke": str(smoke).lower(), "git.commit": "0123456789abcdef" * 2 + "01234567",
                "git.dirty": "false", "sfd.device": "cpu", "sfd.seed": "0", "version.torch": "2.x", "version.sfd": "0.1.0"}
        if row is not None:
            tags["sfd.row"] = row
        if error:
            tags["sfd.error"] = error
        run_id = self.client.create_run(self.exp_id, run_name=f"{row or 'trial'}-{n}", tags=tags).info.run_id
        ts = 1_700_000_000_000
        hist = [Metric(f"loss/step_{k}", 10.0 / (it + 1) / (k + 1), ts + it, it)
                for it in range(6) for k in (history_steps if metrics is not None else ())]
        hist += [Metric("lr", 1e-4, ts + it, it) for it in range(6)] if hist else []
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                              metrics=hist + [Metric(k, v, ts + 10, 0) for k, v in (metrics or {}).items()])
        if samples and metrics is not None:
            self.client.log_artifact(run_id, str(_png(self.tmp / "samples.png")))
        self.client.set_terminated(run_id, status=status)
        if link_trial:
            value = values if values is not None else (
                [metrics.get("objective", 0.0)] if metrics and trial_state == optuna.trial.TrialState.COMPLETE else None)
            tp = trial_params or {}
            self.ostudy.add_trial(optuna.trial.create_trial(
                state=trial_state, values=value, params=tp,
                distributions={k: (optuna.distributions.FloatDistribution(0.001, 0.01) if isinstance(v, float)
                                   else optuna.distributions.CategoricalDistribution(self.spec_choices(k)))
                               for k, v in tp.items()},
                user_attrs={"mlflow_run_id": run_id, **({"sfd.row": row} if row else {})}))
        return run_id

    def spec_choices(self, key):
        return self.spec["space"][key]["choices"]


def _params(solver: str, t_min: float, afs: bool, loss: str, nfe: int = 2, algorithm: str = "sfd",
            teacher: str = "digits", num_samples: int = 500) -> dict:
    return {"teacher.name": teacher, "student.nfe": nfe, "student.afs": afs, "student.t_min": t_min,
            "student.schedule": "polynomial", "solver.name": solver, "solver.m": 3, "loss.name": loss,
            "algorithm": algorithm, "optim.lr": 5e-5, "optim.total_kimg": 2, "optim.batch_size": 64,
            "eval.num_samples": num_samples, "precision": "fp32", "device": "cpu", "seed": 0}


def _final(value: float, metric: str = "fd_digits", hours: float = 0.002) -> dict:
    """The final metrics a CPU run logs (sfd.runner.run.training_cost): its cost is processor time (train/cpu_s, and
    train/device_hours from it), beside wall time."""
    return {metric: value, "nfe": 2, "train/wall_s": hours * 3600, "train/cpu_s": hours * 3600,
            "train/device_hours": hours, "eval/wall_s": 3.0, "total/wall_s": hours * 3600 + 3.0, "objective": value}


def parse_tables(md: str) -> list[list[dict]]:
    """Every markdown table in the text, as a list of {header: cell} dicts."""
    tables, cur, header = [], None, None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")]
            if header is None:
                header, cur = cells, []
            elif set(line.replace("|", "").strip()) <= {"-"}:
                continue
            else:
                cur.append(dict(zip(header, cells)))
        elif header is not None:
            tables.append(cur)
            header, cur = None, None
    if header is not None:
        tables.append(cur)
    return tables


# ---------------------------------------------------------------------------------------------------------
# Ablation study: the full build (notebook executed, artifacts logged)
# ---------------------------------------------------------------------------------------------------------

ABLATION_SPEC = {
    "name": "ablation_tiny", "kind": "ablation", "description": "four paper rows and one extra on the digits teacher",
    "base": "experiments/digits.yaml", "objective": {"metric": "fd_digits", "direction": "minimize"},
    "sampler": {"type": "rows", "seed": 0}, "n_trials": 5,
    "rows": [
        {"id": "vanilla-heun-0.002-l2", "method": "Vanilla", "teacher": "Heun", "t_min": 0.002, "afs": None,
         "loss": "L2", "nfe": 2, "paper_key": "cifar10/ablation/vanilla-heun-0.002-l2", "params": {}},
        {"id": "sfd-dpmpp3m-0.002-noafs-l2", "method": "SFD", "teacher": "DPM++(3M)", "t_min": 0.002, "afs": False,
         "loss": "L2", "nfe": 2, "paper_key": "cifar10/ablation/sfd-dpmpp3m-0.002-noafs-l2", "params": {}},
        {"id": "sfd-dpmpp3m-0.006-noafs-l2", "method": "SFD", "teacher": "DPM++(3M)", "t_min": 0.006, "afs": False,
         "loss": "L2", "nfe": 2, "paper_key": "cifar10/ablation/sfd-dpmpp3m-0.006-noafs-l2", "params": {}},
        {"id": "sfd-dpmpp3m-0.006-afs-l2", "method": "SFD", "teacher": "DPM++(3M)", "t_min": 0.006, "afs": True,
         "loss": "L2", "nfe": 2, "paper_key": "cifar10/ablation/sfd-dpmpp3m-0.006-afs-l2", "params": {}},
        # no paper_key: matched to the paper by its labels
        {"id": "sfd-dpmpp3m-0.006-afs-lpips", "method": "SFD", "teacher": "DPM++(3M)", "t_min": 0.006, "afs": True,
         "loss": "LPIPS", "nfe": 2, "params": {}},
        {"id": "sfd-dpmpp3m-0.006-afs-l1", "method": "SFD", "teacher": "DPM++(3M)", "t_min": 0.006, "afs": True,
         "loss": "L1", "nfe": 2, "paper_key": "cifar10/ablation/sfd-dpmpp3m-0.006-afs-l1", "params": {}},
    ],
}
PAPER_FOR_ROW = {
    "vanilla-heun-0.002-l2": 46.84, "sfd-dpmpp3m-0.002-noafs-l2": 11.65, "sfd-dpmpp3m-0.006-noafs-l2": 10.93, "sfd-dpmpp3m-0.006-afs-l2": 5.67,
    "sfd-dpmpp3m-0.006-afs-lpips": 5.10, "sfd-dpmpp3m-0.006-afs-l1": 4.57,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store and one Optuna storage for the whole file (creating a store costs seconds)."""
    tmp = tmp_path_factory.mktemp("store")
    return {"tmp": tmp, "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "storage": f"sqlite:///{tmp / 'optuna.db'}"}


@pytest.fixture(scope="module")
def ablation(store):
    tmp = store["tmp"]
    L = Layout(store, "ablation_tiny", "ablation", ABLATION_SPEC)
    ids = {}
    ids["vanilla"] = L.run(row="vanilla-heun-0.002-l2", params=_params("heun", 0.002, False, "l2", algorithm="vanilla"),
                           metrics=_final(0.8123456))
    ids["tmin"] = L.run(row="sfd-dpmpp3m-0.002-noafs-l2", params=_params("dpmpp3m", 0.002, False, "l2"),
                        metrics=_final(0.61), samples=False)
    # an interrupted first attempt, then the retry that finished: the finished one is reported
    ids["noafs-crashed"] = L.run(row="sfd-dpmpp3m-0.006-noafs-l2", params=_params("dpmpp3m", 0.006, False, "l2"),
                                 metrics=None, status="FAILED", error="interrupted (process killed)",
                                 trial_state=optuna.trial.TrialState.FAIL)
    ids["noafs"] = L.run(row="sfd-dpmpp3m-0.006-noafs-l2", params=_params("dpmpp3m", 0.006, False, "l2"),
                         metrics=_final(0.4321), history_steps=(0, 1, 2))
    ids["failed"] = L.run(row="sfd-dpmpp3m-0.006-afs-l2", params=_params("dpmpp3m", 0.006, True, "l2"),
                          metrics=None, status="FAILED", error="DivergedError: NaN loss at iteration 3 | step 1",
                          trial_state=optuna.trial.TrialState.FAIL)
    ids["lpips"] = L.run(row="sfd-dpmpp3m-0.006-afs-lpips", params=_params("dpmpp3m", 0.006, True, "lpips"),
                         metrics=_final(0.25, hours=0.004), history_steps=(1, 2))
    # the L1 row is missing: its trial is enqueued but never ran ...
    L.ostudy.enqueue_trial({}, user_attrs={"row": "sfd-dpmpp3m-0.006-afs-l1"})  # as studies/run.py enqueues rows
    # ... and a smoke run of it (a wiring test) must not fill the gap
    ids["smoke"] = L.run(row="sfd-dpmpp3m-0.006-afs-l1", params=_params("dpmpp3m", 0.006, True, "l1"),
                         metrics=_final(0.0777), smoke=True, link_trial=False)
    L.client.set_terminated(L.parent)
    out = tmp / "out"
    md_path = rb.build_report("ablation_tiny", storage=L.storage, tracking_uri=L.tracking_uri, out_dir=out,
                              spec=ABLATION_SPEC)
    return {"L": L, "ids": ids, "out": out, "md": md_path.read_text()}


def _main_table(md: str) -> list[dict]:
    return parse_tables(md)[0]


def test_ablation_cells_equal_tracked_metrics(ablation):
    L, ids = ablation["L"], ablation["ids"]
    rows = _main_table(ablation["md"])
    assert [r["run id"].strip("`") for r in rows if r["run id"] != "—"] == [
        ids["vanilla"], ids["tmin"], ids["noafs"], ids["failed"], ids["lpips"]]
    ours_col = "ours (fd_digits)"
    by_run = {r["run id"].strip("`"): r for r in rows}
    for key in ("vanilla", "tmin", "noafs", "lpips"):
        tracked = L.client.get_run(ids[key]).data.metrics["fd_digits"]
        cell = by_run[ids[key]][ours_col]
        assert cell == rb.fmt_value(tracked)
        assert math.isclose(float(cell), tracked, rel_tol=1e-3)
    # rows in the YAML's (= the paper's) order, labels from the YAML
    assert [(r["Method"], r["Teacher"], r["t_min"], r["AFS"], r["Loss"], r["NFE"]) for r in rows] == [
        ("Vanilla", "Heun", "0.002", "–", "L2", "2"), ("SFD", "DPM++(3M)", "0.002", "no", "L2", "2"),
        ("SFD", "DPM++(3M)", "0.006", "no", "L2", "2"),
        ("SFD", "DPM++(3M)", "0.006", "yes", "L2", "2"), ("SFD", "DPM++(3M)", "0.006", "yes", "LPIPS", "2"),
        ("SFD", "DPM++(3M)", "0.006", "yes", "L1", "2")]


def test_missing_and_failed_rows_are_marked_not_filled(ablation):
    rows = {r["Loss"] + r["AFS"] + r["t_min"]: r for r in _main_table(ablation["md"])}
    missing, failed = rows["L1yes0.006"], rows["L2yes0.006"]
    assert missing["ours (fd_digits)"] == "not run"
    assert missing["run id"] == "—"
    assert failed["ours (fd_digits)"].startswith("failed: DivergedError: NaN loss at iteration 3")
    assert failed["run id"].strip("`") == ablation["ids"]["failed"]
    # the smoke run of the missing row appears nowhere in the report
    assert ablation["ids"]["smoke"] not in ablation["md"]
    assert rb.fmt_value(0.0777) not in ablation["md"]


def test_paper_column_is_paper_numbers_yaml(ablation):
    for r in _main_table(ablation["md"]):
        rid = next(s["id"] for s in ABLATION_SPEC["rows"]
                   if (s["loss"], rb.fmt_afs(s["afs"]), rb.fmt_tmin(s["t_min"])) == (r["Loss"], r["AFS"], r["t_min"])
                   and s["method"] == r["Method"])
        key = f"cifar10/ablation/{rid}"
        assert PAPER_BY_KEY[key]["fid"] == PAPER_FOR_ROW[rid]
        assert r["paper (FID)"] == rb.fmt_paper(PAPER_BY_KEY[key]["fid"])
        assert float(r["paper (FID)"]) == PAPER_BY_KEY[key]["fid"]
        # fd_digits is not FID: no difference is computed across metrics, so no line has one and the Δ column,
        # a "—" on every row, is left out
        assert "Δ" not in r
    md = ablation["md"]
    assert "for orientation only" in md and "NOT FID" in md


def test_header_and_reading(ablation):
    md = ablation["md"]
    for needle in ("Teacher:** digits", "device:** cpu", "Samples per evaluation:** 500", "2 kimg at batch 64",
                   "0123456789ab", "Metric:** `fd_digits`", "Reading of the results",
                   "factor that mattered most in our runs is `t_min`", "(the same direction)",
                   "the same sign as the paper's FID change on 1 of 1 one-factor pairs (t_min 1/1)",
                   "Spearman", "Kendall"):
        assert needle in md, needle


def test_notebook_executes_and_html_exists(ablation):
    import nbformat

    nb = nbformat.read(str(ablation["out"] / "report.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code)
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text = "\n".join(o.get("data", {}).get("text/markdown", "") for c in code for o in c.get("outputs", []))
    assert "not run" in text and rb.fmt_value(0.4321) in text  # the kernel loaded the data itself
    assert "rb.load_study_data(" in code[0].source and "0.4321" not in "".join(c.source for c in code)
    assert (ablation["out"] / "report.html").stat().st_size > 10_000
    streams = "".join(o.get("text", "") for o in code[0].get("outputs", []) if o.get("output_type") == "stream")
    assert f"kernel interpreter: {sys.executable}" in streams  # the venv's ipykernel, not whatever is on PATH


def test_notebook_opens_with_the_narrative_and_tables_and_shows_no_warning(ablation):
    import nbformat

    nb = nbformat.read(str(ablation["out"] / "report.ipynb"), as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# Study report")
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code[:4]:  # set-up, tables, reading, figures: their code collapsed, their output shown
        assert "hide-input" in cell.metadata["tags"] and cell.metadata["jupyter"]["source_hidden"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    shown = [o["data"].get("text/markdown", "image" if "image/png" in o["data"] else "") for o in outputs
             if o.get("output_type") == "display_data"]
    first_image = shown.index("image")
    before = "\n".join(shown[:first_image])
    for heading in ("# Report: `ablation_tiny`", "## Ablation (paper's layout and order)", "## Reading of the results"):
        assert heading in before, heading
    assert not [o["text"] for o in outputs if o.get("output_type") == "stream" and o["name"] == "stderr"]
    html = (ablation["out"] / "report.html").read_text()
    assert "Ablation (paper" in html and "rb.load_study_data(" not in html  # the collapsed code stays out


@pytest.mark.slow
def test_notebook_names_no_path_of_the_building_machine_and_runs_from_another_folder(ablation, tmp_path,
                                                                                      monkeypatch):
    """The notebook finds the checkout and the stores relative to its own folder (the build ran it so), or,
    moved elsewhere, from the environment."""
    import shutil

    import nbformat

    L, out = ablation["L"], ablation["out"]
    source = "\n".join(c.source for c in nbformat.read(str(out / "report.ipynb"), as_version=4).cells)
    assert not re.findall(r"""['"]/[^'"]*""", source)  # no absolute path in a string: all are relative
    assert str(L.tmp) not in source
    moved = tmp_path / "elsewhere" / "a" / "deeper" / "folder"
    shutil.copytree(out, moved)
    monkeypatch.setenv("SFD_REPO", str(ROOT))
    monkeypatch.setenv("SFD_REPORT_TRACKING_URI", L.tracking_uri)
    monkeypatch.setenv("SFD_REPORT_STORAGE", L.storage)
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the kernel finds `reports` through SFD_REPO alone
    rb.run_notebook(moved / "report.ipynb", cwd=moved)
    code = [c for c in nbformat.read(str(moved / "report.ipynb"), as_version=4).cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert rb.fmt_value(0.4321) in text and ablation["ids"]["noafs"] in text


def test_run_ids_link_to_their_page_in_the_mlflow_ui_on_a_tracking_server(ablation):
    """MLflow's own client points at a run as {server}/#/experiments/{experiment id}/runs/{run id} (`_log_url` in
    mlflow/tracking/_tracking_service/client.py, MLflow 3); a sqlite store has no UI address: ids stay plain."""
    L, ids = ablation["L"], ablation["ids"]
    data = rb.load_study_data("ablation_tiny", storage=L.storage, tracking_uri=L.tracking_uri, spec=ABLATION_SPEC)
    assert f"`{ids['noafs']}`" in list(rb.ablation_table(data)["run id"])
    served = dataclasses.replace(data, tracking_uri="http://mlflow.example:5000/")
    page = f"http://mlflow.example:5000/#/experiments/{data.experiment_id}/runs/{{}}"
    assert f"[`{ids['noafs']}`]({page.format(ids['noafs'])})" in list(rb.ablation_table(served)["run id"])
    every_run = rb.report_markdown(served).split("## All tracked runs")[1]
    for key in ("vanilla", "noafs-crashed", "noafs", "failed", "lpips"):
        assert f"[`{ids[key]}`]({page.format(ids[key])})" in every_run, key


def test_a_long_reason_is_given_in_full_under_the_table_not_cut_off_in_its_cell(store):
    reason = ("LPIPS (VGG16 at 224x224 per 8x8 sample) takes hours on a CPU at this budget and needs the "
              "lpips-vgg16 weights; delete this entry to run it on a GPU")  # ablation_digits' own
    spec = {"name": "skip_long", "kind": "ablation", "objective": {"metric": "fd_digits", "direction": "minimize"},
            "skip_rows": {"sfd-lpips": reason},
            "rows": [{"id": f"sfd-{loss}", "method": "SFD", "teacher": "DPM++(3M)", "t_min": 0.006, "afs": True,
                      "loss": label, "nfe": 2, "paper_key": None} for loss, label in (("l1", "L1"), ("lpips", "LPIPS"))]}
    L = Layout(store, "skip_long", "ablation", spec)
    L.run(row="sfd-l1", params=_params("dpmpp3m", 0.006, True, "l1"), metrics=_final(15.9), history_steps=(),
          samples=False)
    md = rb.report_markdown(rb.load_study_data("skip_long", storage=L.storage, tracking_uri=L.tracking_uri,
                                               spec=spec))
    lpips = next(r for r in _main_table(md) if r["Loss"] == "LPIPS")
    assert lpips["ours (fd_digits)"] == "not run (skipped: see under the table)"
    under = md[md.index("## Ablation"):md.index("## Reading")]
    assert f"- `sfd-lpips` (not run): skipped: {reason}\n" in under and "…" not in md


def test_figures_exist_png_and_svg(ablation):
    fig_dir = ablation["out"] / "figures"
    for name in ("metric_vs_hours", "ablation_bars", "loss_curves", "sample_grids"):
        for ext in ("png", "svg"):
            f = fig_dir / f"{name}.{ext}"
            assert f.exists() and f.stat().st_size > 1000, f
    assert (fig_dir / "samples" / "vanilla-heun-0.002-l2.png").exists()
    assert "![loss_curves](figures/loss_curves.png)" in ablation["md"]
    # every row is at NFE 2: a metric-vs-NFE figure would have nothing to show, so there is none
    assert not (fig_dir / "metric_vs_nfe.png").exists() and "metric_vs_nfe" not in ablation["md"]


def test_report_logged_on_parent_run(ablation):
    L = ablation["L"]

    def walk(path):
        out = []
        for a in L.client.list_artifacts(L.parent, path):
            out.extend(walk(a.path) if a.is_dir else [a.path])
        return out
    logged = set(walk("report"))
    for p in ("report/report.md", "report/report.ipynb", "report/report.html", "report/figures/metric_vs_hours.png",
              "report/figures/metric_vs_hours.svg", "report/figures/loss_curves.svg", "report/figures/sample_grids.png"):
        assert p in logged, (p, sorted(logged))
    assert L.client.get_run(L.parent).data.tags.get("sfd.report") == "report/report.md"


def test_report_tables_round_trip_as_mlflow_tables(ablation, monkeypatch):
    """The ablation table is logged with MLflow's log_table on the parent run: MLflow's load_table reads back the
    table the report shows, and a rebuild replaces it (log_table alone would append the rows again)."""
    L = ablation["L"]
    experiment_id = L.client.get_run(L.parent).info.experiment_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", L.tracking_uri)  # load_table searches the process's store (search_runs)
    data = rb.load_study_data("ablation_tiny", storage=L.storage, tracking_uri=L.tracking_uri, spec=ABLATION_SPEC)
    expected = rb.ablation_table(data).reset_index(drop=True)
    file = "report/tables/Ablation_paper_s_layout_and_order.json"
    assert "mlflow.loggedArtifacts" in L.client.get_run(L.parent).data.tags  # what the UI's table views read
    for build in range(2):
        loaded = L.client.load_table(experiment_id, file, run_ids=[L.parent])
        assert list(loaded.columns) == list(expected.columns) and len(loaded) == len(expected) > 1
        # load_table reads with pandas' type inference ("5.10" comes back as 5.1); the file holds the cells as shown
        logged = pd.read_json(L.client.download_artifacts(L.parent, file, str(ablation["out"].parent / f"t{build}")),
                              orient="split", dtype=False)
        pd.testing.assert_frame_equal(logged, expected)
        if build == 0:
            rb.log_report(data, ablation["out"])


def test_a_failed_rebuild_leaves_the_earlier_report_whole(ablation, monkeypatch):
    """A report is built aside and moved in only when complete: a build that fails midway changes nothing,
    leaves no hidden staging folder, and a rebuild replaces only the entries a build makes."""
    L = ablation["L"]
    out = ablation["out"].parent / "rebuilt"
    build = dict(storage=L.storage, tracking_uri=L.tracking_uri, spec=ABLATION_SPEC, execute_notebook=False,
                 log_to_mlflow=False)
    rb.build_report("ablation_tiny", out_dir=out, **build)
    (out / "report.html").write_text("an html of an earlier, executed build")
    (out / "my-notes.txt").write_text("the user's own file")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    with monkeypatch.context() as m:
        m.setattr(rb, "report_markdown", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            rb.build_report("ablation_tiny", out_dir=out, **build)
        with pytest.raises(RuntimeError, match="disk full"):
            rb.build_report("ablation_tiny", out_dir=out.parent / "never", **build)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (out.parent / "never").exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left

    rb.build_report("ablation_tiny", out_dir=out, **build)
    assert not (out / "report.html").exists()  # this build executed no notebook: no stale html beside it
    assert (out / "my-notes.txt").read_text() == "the user's own file"
    assert (out / "report.md").read_text().startswith("# ") and (out / "figures" / "loss_curves.png").exists()


# ---------------------------------------------------------------------------------------------------------
# Comparison and search layouts (no notebook execution here)
# ---------------------------------------------------------------------------------------------------------

COMPARISON_SPEC = {
    "name": "comparison_tiny", "kind": "comparison", "objective": {"metric": "fid", "direction": "minimize"},
    "rows": [
        {"id": "dpmpp3m-5", "group": "solver", "method": "DPM++(3M)", "nfe": 5, "paper_key": "cifar10/dpmpp3m/5"},
        {"id": "sfd-2", "group": "sfd", "method": "SFD", "nfe": 2, "paper_key": "cifar10/sfd/2"},
        {"id": "sfd-3", "group": "sfd", "method": "SFD", "nfe": 3},
        {"id": "sfd-v-2", "group": "sfd-v", "method": "SFD-v", "nfe": 2, "paper_key": "cifar10/sfd-v/2"},
    ],
}


def test_comparison_layout(store, tmp_path):
    L = Layout(store, "comparison_tiny", "comparison", COMPARISON_SPEC)
    fid = {"dpmpp3m-5": 30.5, "sfd-2": 5.1, "sfd-3": 4.0}
    ids = {}
    for rid, nfe, algo in (("dpmpp3m-5", 5, "baseline"), ("sfd-2", 2, "sfd"), ("sfd-3", 3, "sfd")):
        p = _params("dpmpp3m", 0.006, True, "l1", nfe=nfe, algorithm=algo, teacher="cifar10-uncond",
                    num_samples=50000)
        metrics = {**_final(fid[rid], metric="fid", hours=0.0 if algo == "baseline" else 0.5), "nfe": nfe}  # as sampled
        ids[rid] = L.run(row=rid, params=p, metrics=metrics, history_steps=() if algo == "baseline" else (1, 2),
                         samples=False)
    # no spec argument and no studies/comparison_tiny.yaml: the builder finds the YAML the runner recorded on
    # the parent run, and the rows the runner skipped for a missing asset
    spec_file = tmp_path / "comparison_tiny.yaml"
    spec_file.write_text(yaml.safe_dump(COMPARISON_SPEC))
    L.client.set_tag(L.parent, "sfd.spec_path", str(spec_file))
    L.client.set_tag(L.parent, "sfd.skipped_rows", "sfd-v-2: MissingAssetError: no sfd-v student; fetch it")
    out = tmp_path / "out"
    md = rb.build_report("comparison_tiny", storage=L.storage, tracking_uri=L.tracking_uri, out_dir=out,
                         execute_notebook=False, log_to_mlflow=False).read_text()
    rows = parse_tables(md)[0]
    ours = [r for r in rows if r["Source"] == "ours"]
    assert [r["run id"].strip("`") for r in ours[:3]] == [ids["dpmpp3m-5"], ids["sfd-2"], ids["sfd-3"]]
    for r in ours[:3]:
        rid = next(k for k, v in ids.items() if v == r["run id"].strip("`"))
        assert r["ours (fid)"] == rb.fmt_value(fid[rid])
    sfd2 = next(r for r in ours if r["run id"].strip("`") == ids["sfd-2"])
    assert sfd2["paper (FID)"] == rb.fmt_paper(4.53) and sfd2["Δ"] == rb.fmt_delta(5.1 - 4.53)
    sfd3 = next(r for r in ours if r["run id"].strip("`") == ids["sfd-3"])
    assert sfd3["paper (FID)"] == rb.fmt_paper(3.58)  # matched by method + NFE
    assert next(r for r in ours if r["Method"] == "SFD-v")["ours (fid)"] == \
        "not run (skipped: MissingAssetError: no sfd-v student; fetch it)"
    # distillation methods we did not run are the paper's rows, labelled as such, never measured
    paper_only = [r for r in rows if r["Source"] == "paper"]
    assert {"PD", "CD", "CTM", "Guided PD"} <= {r["Method"] for r in paper_only}
    assert all(r["ours (fid)"] == "—" and r["run id"] == "—" for r in paper_only)
    pd1 = next(r for r in paper_only if r["Method"] == "PD" and r["NFE"] == "1")
    assert pd1["paper (FID)"] == rb.fmt_paper(PAPER_BY_KEY["cifar10/pd/1"]["fid"]) and pd1["paper A100-h"] == "~195"
    # grouped in the paper's order
    groups = list(dict.fromkeys(r["Group"] for r in rows))
    assert groups == [PAPER["groups"][g] for g in ("solver", "distillation", "sfd", "sfd-v", "second-stage")]
    assert "Δ = ours − paper" in md
    for name in ("metric_vs_nfe", "metric_vs_hours", "loss_curves"):
        assert (out / "figures" / f"{name}.svg").exists()
    assert (out / "report.ipynb").exists()


SEARCH_SPEC = {
    "name": "search_tiny", "kind": "search", "objective": {"metric": "fd_digits", "direction": "minimize"},
    "sampler": {"type": "tpe", "seed": 0}, "n_trials": 6,
    "space": {"solver.name": {"type": "categorical", "choices": ["heun", "dpmpp3m"]},
              "loss.name": {"type": "categorical", "choices": ["l1", "l2"]},
              "student.t_min": {"type": "float", "low": 0.001, "high": 0.01, "log": True}},
}


def test_search_layout(store, tmp_path):
    L = Layout(store, "search_tiny", "search", SEARCH_SPEC)
    ids = []
    for i, (solver, loss, tmin) in enumerate([("heun", "l2", 0.002), ("dpmpp3m", "l2", 0.002), ("heun", "l1", 0.006),
                                              ("dpmpp3m", "l1", 0.006), ("dpmpp3m", "l1", 0.003),
                                              ("heun", "l2", 0.008)]):
        value = (1.0 if solver == "heun" else 0.3) + (0.05 if loss == "l2" else 0.0) + tmin
        ids.append(L.run(row=None, params=_params(solver, tmin, True, loss), metrics=_final(value),
                         trial_params={"solver.name": solver, "loss.name": loss, "student.t_min": tmin},
                         history_steps=(1,), samples=(i == 0)))
    L.run(row=None, params=_params("heun", 0.004, True, "l1"), metrics=None, status="FAILED", error="boom",
          trial_state=optuna.trial.TrialState.FAIL, trial_params={"solver.name": "heun"})
    out = tmp_path / "out"
    md = rb.build_report("search_tiny", storage=L.storage, tracking_uri=L.tracking_uri, out_dir=out,
                         spec=SEARCH_SPEC, execute_notebook=False, log_to_mlflow=False).read_text()
    tables = parse_tables(md)
    best = tables[0]
    assert best[0]["run id"].strip("`") == ids[4] and best[0]["solver.name"] == "dpmpp3m"
    assert best[0]["ours (fd_digits)"] == rb.fmt_value(L.client.get_run(ids[4]).data.metrics["fd_digits"])
    imp = tables[1]
    assert {r["parameter"] for r in imp} == {"solver.name", "loss.name", "student.t_min"}
    assert max(imp, key=lambda r: float(r["importance"]))["parameter"] == "solver.name"
    assert "Most important parameter for fd_digits:** `solver.name`" in md
    for name in ("param_importances", "optimization_history"):
        assert (out / "figures" / f"{name}.png").exists() and (out / "figures" / f"{name}.svg").exists()


def test_missing_study_is_a_clear_error(store, ablation):
    with pytest.raises(rb.ReportError, match="no MLflow experiment 'nope'"):
        rb.load_study_data("nope", tracking_uri=store["tracking_uri"], spec={})
    with pytest.raises(rb.ReportError, match="no MLflow experiment 'ablation_tiny-smoke'"):
        rb.load_study_data("ablation_tiny", tracking_uri=store["tracking_uri"], smoke=True, spec={})
    missing = store["tmp"] / "nowhere" / "mlflow.db"
    with pytest.raises(rb.ReportError, match="no MLflow store at"):
        rb.load_study_data("ablation_tiny", tracking_uri=f"sqlite:///{missing}", spec={})
    assert not missing.parent.exists()  # reading never creates a store


def test_seed_noise_reading_leaves_out_rows_the_seed_cannot_move():
    from reports.reading import _seed_noise_reading

    rows = [{"value_sd": 0.0, "n_seeds": 3}, {"value_sd": 0.0, "n_seeds": 3},  # solver baselines
            {"value_sd": 1.0, "n_seeds": 3}, {"value_sd": 3.0, "n_seeds": 3}, {"value_sd": 2.0, "n_seeds": 3},
            {"value_sd": None}]  # a single run
    (text,) = _seed_noise_reading(rows, "fd_digits")
    assert "across the 3 rows that vary with the seed is 2 in fd_digits" in text
    assert "smaller than about 4 are within" in text and "2 rows gave the same value for every seed" in text
    (text,) = _seed_noise_reading(rows[:2], "fd_digits")
    assert "nothing measured here depends on the run seed" in text
    assert _seed_noise_reading([{"value_sd": None}], "fd_digits") == []


def test_sfdv_lines_carry_the_seed_spread_of_their_own_nfe():
    from reports.rows import _per_nfe_lines

    per_seed = [{"fd_digits": 10.0, "fd_digits/nfe_3": 12.0}, {"fd_digits": 14.0, "fd_digits/nfe_3": 20.0}]
    run = {"metrics": {"fd_digits": 12.0, "fd_digits/nfe_3": 16.0},
           "replicates": {"metrics": per_seed, "values": [10.0, 14.0], "expected": 2}}
    line = {"row_id": "sfd-v", "nfe": 2, "status": "ok", "extra": {}, "paper_key": None, "value_sd": 2.83}
    (nfe3,) = _per_nfe_lines(line, run, "fd_digits", {"index": {}, "comparison": {}}, "digits", "comparison")
    assert nfe3["value"] == 16.0 and nfe3["value_sd"] == pytest.approx(5.656854, rel=1e-6)  # sd of 12 and 20
    run.pop("replicates")
    (single,) = _per_nfe_lines({**line, "value_sd": None}, run, "fd_digits", {"index": {}, "comparison": {}}, "digits", "comparison")
    assert single["value_sd"] is None


def test_extra_metric_columns_of_seed_means_carry_the_seed_spread():
    """A replicated row's extra metrics are seed means: their ± is the sd over seeds with n, like the main
    column, not the per-sample sd a single run's teacher gap carries."""
    import types

    import pandas as pd
    from reports.rows import _replicate_fields
    from reports.tables import _extra_cells

    per_seed = [{"fd_digits": 10.0, "pixel_fd": 2.0, "teacher_gap_mean": 0.10, "teacher_gap_std": 0.03},
                {"fd_digits": 14.0, "pixel_fd": 4.0, "teacher_gap_mean": 0.12, "teacher_gap_std": 0.05}]
    run = {"run_id": "a", "replicates": {"metrics": per_seed, "values": [10.0, 14.0], "expected": 2,
                                         "run_ids": ["a", "b"], "seeds": [0, 1]}}
    row = {"extra": {"pixel_fd": 3.0, "teacher_gap_mean": 0.11, "teacher_gap_std": 0.04},
           **_replicate_fields(run, "ok")}
    data = types.SimpleNamespace(rows=pd.DataFrame([row], dtype=object))
    cells = _extra_cells(data, row)
    assert cells["ours (pixel_fd)"] == "3 ± 1.414 (n=2)"
    assert cells["ours (teacher_gap)"] == "0.11 ± 0.01414 (n=2)"
    single = {"extra": {"pixel_fd": 3.0, "teacher_gap_mean": 0.11, "teacher_gap_std": 0.04}}
    assert _extra_cells(data, single) == {"ours (pixel_fd)": "3", "ours (teacher_gap)": "0.11 ± 0.04"}


def test_cli_errors_create_no_folder_and_hint_only_real_studies(store, ablation, tmp_path, monkeypatch, capsys):
    """A study that is not there, or an Optuna storage file that is not there, is an error before any folder
    is created or anything is logged; the hint names studies that exist."""
    monkeypatch.setattr(rb, "DEFAULT_OUT_ROOT", tmp_path / "default")
    out = tmp_path / "out"
    uri = ["--tracking-uri", store["tracking_uri"]]
    assert rb.main(["ablation_digitz", "--out", str(out), *uri]) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment 'ablation_digitz'" in err and "did you mean ablation_digits" in err
    assert "studies/run.py ablation_digitz" not in err
    assert rb.main(["ablation_digitz", *uri]) == 2
    assert not out.exists() and not (tmp_path / "default").exists()

    parent = ablation["L"].parent
    before = {a.path for a in ablation["L"].client.list_artifacts(parent, "report")}
    missing = tmp_path / "nowhere" / "optuna.db"
    storage = ["--storage", f"sqlite:///{missing}"]
    assert rb.main(["ablation_tiny", "--out", str(out), "--no-notebook", *storage, *uri]) == 2
    assert f"no Optuna storage at {missing}" in capsys.readouterr().err
    assert not out.exists() and not missing.parent.exists()
    assert {a.path for a in ablation["L"].client.list_artifacts(parent, "report")} == before  # nothing logged


def test_check_out_dir_refuses_a_file_there_or_above(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(rb.ReportError, match=f"output folder {afile} exists and is not a folder"):
        rb.check_out_dir(afile)
    with pytest.raises(rb.ReportError, match=f"cannot be created: {afile} is not a folder"):
        rb.check_out_dir(afile / "sub" / "out")
    rb.check_out_dir(tmp_path)  # an existing folder, and one still to be made, are fine
    rb.check_out_dir(tmp_path / "new" / "out")


def _refused_before_loading(monkeypatch, capsys, argv: list[str]) -> str:
    """rb.main(argv) fails with one `error:` line before the study is loaded; returns that line."""
    monkeypatch.setattr(rb, "load_study_data", lambda *a, **k: pytest.fail("the study was loaded"))
    assert rb.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_cli_refuses_an_out_that_is_a_file_before_building(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    err = _refused_before_loading(monkeypatch, capsys, ["ablation_tiny", "--out", str(afile), "--no-log"])
    assert f"output folder {afile} exists and is not a folder" in err
    assert afile.read_text() == "mine" and sorted(tmp_path.iterdir()) == [afile]


def test_spec_must_define_the_study_being_built(tmp_path, monkeypatch, capsys):
    other = Path(rb.PAPER_NUMBERS_PATH).parents[1] / "studies" / "ablation_digits.yaml"
    err = _refused_before_loading(monkeypatch, capsys, ["ux_base", "--spec", str(other), "--out",
                                                        str(tmp_path / "out"), "--no-log"])
    assert f"study YAML {other} defines study 'ablation_digits', not 'ux_base'" in err
    assert not (tmp_path / "out").exists()
    # its own YAML, a --seeds study's saved YAML, a YAML without name: (named after its file), a dict
    rb.check_spec_name("ablation_digits", other)
    seeds = tmp_path / "ablation_digits-seeds-0-1.yaml"
    seeds.write_text(yaml.safe_dump({"name": "ablation_digits-seeds-0-1", "kind": "ablation", "seeds": [0, 1]}))
    rb.check_spec_name("ablation_digits-seeds-0-1", seeds)
    (tmp_path / "plain.yaml").write_text("kind: ablation\n")
    rb.check_spec_name("plain", tmp_path / "plain.yaml")
    rb.check_spec_name("ablation_tiny", ABLATION_SPEC)
    with pytest.raises(rb.ReportError, match="defines study 'ablation_tiny', not 'comparison_tiny'"):
        rb.check_spec_name("comparison_tiny", ABLATION_SPEC)


def test_run_hint_suggests_the_command_that_makes_the_study():
    assert rb.run_hint("ablation_digits", smoke=True) == "run `python studies/run.py ablation_digits --smoke` first"
    assert rb.run_hint("ablation_digits-seeds-0-1", smoke=False) == (
        "run `python studies/run.py ablation_digits --seeds 0 1` first")
    assert "(did you mean mini?)" in rb.run_hint("minii", smoke=False, known={"mini"})
    assert "(studies: ablation_cifar," in rb.run_hint("zzzz", smoke=False)


def test_ablation_rows_of_another_dataset_get_no_paper_number_by_label():
    """The paper's ablation is CIFAR-10's. An ImageNet-64 ablation row without a paper_key used to be matched by
    its labels to the CIFAR-10 row and shown (with a Δ) as the paper's ImageNet number."""
    from reports.paper import load_paper_numbers
    from reports.paper import paper_row as _paper_row

    paper = load_paper_numbers()
    labels = {"method": "SFD", "teacher": "DPM++(3M)", "t_min": 0.006, "afs": True, "loss": "L1", "nfe": 2}
    cifar = _paper_row({"id": "sfd-dpmpp3m-0.006-afs-l1"}, labels, paper, "cifar10", "ablation")
    assert cifar is not None and cifar["fid"] == 4.57 and cifar["dataset"] == "cifar10"
    assert _paper_row({"id": "sfd-dpmpp3m-0.006-afs-l1"}, labels, paper, "imagenet64", "ablation") is None


# ---------------------------------------------------------------------------------------------------------
# Builds that are stopped or killed (issue 18)
# ---------------------------------------------------------------------------------------------------------

def _stages(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def _build_command(L, out: Path, spec: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "reports" / "build.py"), "ablation_tiny", "--out", str(out), "--storage",
            L.storage, "--tracking-uri", L.tracking_uri, "--spec", str(spec), "--no-log", *extra]


def _start_and_wait_for_stage(command: list[str], folder: Path, ready: str):
    """Start a build; return the process once its stage folder holds `ready` (it is then mid-build)."""
    import subprocess
    import time

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the build ended before it could be stopped: {proc.communicate()}")
        if any((folder / name / ready).exists() for name in _stages(folder)):
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the build never reached its stage folder")


def test_a_killed_build_leaves_a_stage_that_the_next_build_removes_but_not_a_live_builds(ablation, tmp_path,
                                                                                          monkeypatch):
    """SIGKILL mid-build (the notebook executing) leaves its hidden stage folder: the next build beside it
    removes it, leaves alone the stage of a build that is still running (it holds its lock), and leaves no
    temporary folder anywhere (the notebook's kernel downloaded its sample grids into one)."""
    import fcntl
    import signal

    L = ablation["L"]
    spec = tmp_path / "ablation_tiny.yaml"
    spec.write_text(yaml.safe_dump(ABLATION_SPEC))
    site = tmp_path / "site"
    out = site / "ablation_tiny"
    proc = _start_and_wait_for_stage(_build_command(L, out, spec), site, "report.ipynb")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed = _stages(site)
    assert len(killed) == 1 and killed[0].startswith(".ablation_tiny-building-")

    live = site / ".ablation_tiny-building-live"  # a build still running beside it holds its stage's lock
    live.mkdir()
    held = os.open(live, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the notebook's kernel reads it
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    try:
        rb.build_report("ablation_tiny", storage=L.storage, tracking_uri=L.tracking_uri, out_dir=out,
                        spec=ABLATION_SPEC, log_to_mlflow=False)
        assert _stages(site) == [live.name]
    finally:
        os.close(held)
    assert (out / "report.html").is_file()
    assert list(scratch.iterdir()) == []


def test_a_stopped_build_removes_its_stage_and_says_so_in_one_line(ablation, tmp_path):
    import signal

    L = ablation["L"]
    spec = tmp_path / "ablation_tiny.yaml"
    spec.write_text(yaml.safe_dump(ABLATION_SPEC))
    out = tmp_path / "site" / "ablation_tiny"
    proc = _start_and_wait_for_stage(_build_command(L, out, spec), out.parent, "report.ipynb")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.splitlines() == [
        "error: stopped by SIGTERM (any MLflow run it had open is ended KILLED)"], err
    assert _stages(out.parent) == [] and not out.exists()


@pytest.mark.parametrize("content,why", [
    (b"\x00\x01garbage" * 100, "is not an SQLite database"),
    (b"root:x:0:0:root:/root:/bin/bash\n", "is not an SQLite database (it starts with b'root:x:0')"),
])
def test_a_storage_that_is_not_a_database_is_an_error_not_a_report_without_trials(ablation, tmp_path, capsys,
                                                                                  content, why):
    """`--storage` naming a garbage file exited 0 with a report whose trials were missing (the load failure became
    a note); it is a one-line error before anything is built or logged, and so is a journal file that holds
    no Optuna journal."""
    L = ablation["L"]
    garbage = tmp_path / "optuna.db"
    garbage.write_bytes(content)
    out = tmp_path / "out"
    argv = ["ablation_tiny", "--out", str(out), "--no-notebook", "--no-log", "--tracking-uri", L.tracking_uri]
    assert rb.main([*argv, "--storage", f"sqlite:///{garbage}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err and "--storage" in err, err
    journal = tmp_path / "journal.log"
    journal.write_bytes(content)
    assert rb.main([*argv, "--storage", str(journal)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not be loaded from" in err and "(--storage)" in err, err
    assert not out.exists() and garbage.read_bytes() == content and journal.read_bytes() == content
