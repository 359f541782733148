"""The report's tables (ablation / comparison / search / every run) as pandas frames, the notes under them, and
their markdown.

Part of the report builder (``reports/build.py``); imports ``reports.formatting`` and ``reports.loading``."""
from __future__ import annotations

import math
import re
import warnings

import optuna
import pandas as pd

from reports.formatting import (canon, fmt_afs, fmt_delta, fmt_hours, fmt_paper, fmt_run_id, fmt_tmin, fmt_value,
                                is_num, to_float)
from reports.loading import StudyData
from sfd.metrics.names import QUALITY_KEYS

# The ablation table's label columns (the factors the paper varies).
FACTORS = ("method", "teacher", "t_min", "afs", "loss", "nfe", "guidance")
GROUP_ORDER = ("solver", "distillation", "sfd", "sfd-v", "second-stage")
# A reason longer than this is given in full under its table, not cut off inside the value column.
REASON_IN_CELL = 90
UNDER_THE_TABLE = "see under the table"


# ----- cells -----------------------------------------------------------------------------------------------

def _reason(r: dict) -> str:
    return re.sub(r"\s+", " ", str(r.get("reason") or "")).strip()


def long_reasons(data: StudyData) -> list[dict]:
    """The lines whose reason does not fit their value cell (each line of a row once)."""
    return [r for r in data.rows.to_dict("records") if r["status"] != "ok" and not r.get("derived_from")
            and len(_reason(r)) > REASON_IN_CELL] if len(data.rows) else []


def _ours_cell(r: dict) -> str:
    if r["status"] == "ok":
        if not is_num(r.get("n_seeds")):
            return fmt_value(r["value"])
        n, expected = int(r["n_seeds"]), int(r["seeds_expected"])
        sd = f" ± {fmt_value(r['value_sd'])}" if is_num(r.get("value_sd")) else ""
        return f"{fmt_value(r['value'])}{sd} (n={n}{'' if n == expected else f' of {expected}'})"
    reason = _reason(r)
    if len(reason) > REASON_IN_CELL:  # its kind ("skipped", "DivergedError") stays, the rest goes under the table
        kind, sep, _ = reason.partition(": ")
        reason = f"{kind}: {UNDER_THE_TABLE}" if sep and len(kind) <= 40 else UNDER_THE_TABLE
    if r["status"] == "failed":
        return f"failed: {reason}"
    return f"{r['status']} ({reason})" if reason else r["status"]


def _run_cell(data: StudyData, r: dict) -> str:
    """The run a line shows (every seed's run in a replicated study), linked to the MLflow UI on a server."""
    if r.get("seed_runs") and r.get("run_id"):
        return ", ".join(_seed_run_cell(data, *seed_run) for seed_run in r["seed_runs"])
    return fmt_run_id(r["run_id"], data.run_url(r["run_id"])) if r.get("run_id") else "—"


def _seed_run_cell(data: StudyData, seed: int, run_id: str | None, status: str | None) -> str:
    if run_id is None:
        return f"seed {seed}: not run"
    return f"{fmt_run_id(run_id, data.run_url(run_id))} (seed {seed}{'' if status == 'FINISHED' else f', {status}'})"


def seed_mean_label(data: StudyData) -> str:
    """Cost cells of a replicated study are means over its seeds' runs; say so where they appear."""
    return " (mean over seeds)" if data.spec.get("seeds") else ""


def _delta(data: StudyData, r: dict) -> float | None:
    if data.comparable and r["status"] == "ok" and is_num(r.get("paper_value")):
        return r["value"] - r["paper_value"]
    return None


def metric_label(data: StudyData) -> str:
    return data.metric


def extra_metrics(data: StudyData) -> list[str]:
    """Quality metrics the rows logged besides the report's metric (a column each; the teacher gap's std
    goes with its mean)."""
    rows = data.rows.to_dict("records") if len(data.rows) else []
    have = {m for r in rows for m in (r.get("extra") or {})}
    return [m for m in QUALITY_KEYS if m in have and m != "teacher_gap_std"]


def _extra_cells(data: StudyData, r: dict) -> dict:
    out = {}
    for m in extra_metrics(data):
        ex = r.get("extra") or {}
        v = ex.get(m)
        text = "—" if v is None else fmt_value(v)
        sds = r.get("extra_sd")  # a dict on replicated rows; absent, or NaN from the DataFrame, elsewhere
        seed_sd = sds.get(m) if isinstance(sds, dict) else None
        if v is not None and is_num(r.get("n_seeds")):  # a seed mean: its ± is over seeds, as the main column's
            text += (f" ± {fmt_value(seed_sd)}" if is_num(seed_sd) else "") + f" (n={int(r['n_seeds'])})"
        elif m == "teacher_gap_mean" and v is not None and ex.get("teacher_gap_std") is not None:
            text += f" ± {fmt_value(ex['teacher_gap_std'])}"  # over samples
        out[f"ours ({'teacher_gap' if m == 'teacher_gap_mean' else m})"] = text
    return out


def _shows_guidance(data: StudyData) -> bool:
    rows = data.rows.to_dict("records") if len(data.rows) else []
    return any(r.get("guidance") not in (None, 1.0) for r in rows)


def _without_empty_delta(df: pd.DataFrame) -> pd.DataFrame:
    """A Δ column with no difference on any line is left out (Δ is computed only for FID on the paper's data)."""
    return df.drop(columns="Δ") if "Δ" in df and (df["Δ"] == "—").all() else df


# ----- the study's table -------------------------------------------------------------------------------------

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
                    "run id": _run_cell(data, r)})
    return _without_empty_delta(pd.DataFrame(out))


def _is_sfdv(r: dict) -> bool:
    return r.get("algorithm") == "sfd-v" or r.get("group") == "sfd-v"


def _family(paper_key) -> str:
    """A paper key without its NFE: `cifar10/sfd-v/3` -> `cifar10/sfd-v`."""
    return str(paper_key).rsplit("/", 1)[0]


def _sfdv_row_of(ours: list[dict], p: dict) -> dict | None:
    """Our SFD-v row (one model, read at several NFE) whose paper family the paper line `p` belongs to."""
    return next((r for r in ours if _is_sfdv(r) and not r.get("derived_from") and r.get("paper_key")
                 and _family(r["paper_key"]) == _family(p["key"])), None)


def _not_evaluated_cell(data: StudyData, r: dict) -> str:
    if r["status"] == "ok":
        return "not evaluated at this NFE" + (" in a smoke run" if data.smoke else "")
    return f"not evaluated: row `{r['row_id']}` {r['status']}"


def _comparison_entries(data: StudyData) -> list[dict]:
    """Our lines and the paper's lines we did not run, in the paper's grouping: by group, method, NFE."""
    ours = data.rows.to_dict("records")
    used = {r["paper_key"] for r in ours if r.get("paper_key")}
    entries = [{"group": r.get("group") or "sfd", "method": r["method"] or "—", "nfe": r["nfe"], "source": "ours",
                "r": r} for r in ours]
    entries += [{"group": p["group"], "method": p["method"], "nfe": p["nfe"], "source": "paper", "p": p}
                for p in data.paper["comparison"].get(data.paper_dataset, []) if p["key"] not in used]
    method_order: dict[tuple, int] = {}
    for e in entries:
        method_order.setdefault((e["group"], canon(e["method"])), len(method_order))
    group_rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    entries.sort(key=lambda e: (group_rank.get(e["group"], len(GROUP_ORDER)),
                                method_order[(e["group"], canon(e["method"]))],
                                e["nfe"] if e["nfe"] is not None else 10 ** 6, e["source"] != "ours"))
    return entries


def comparison_table(data: StudyData) -> pd.DataFrame:
    """Table 2/3 layout: our rows beside the paper's, grouped as the paper groups them; paper-only rows
    (methods we did not run) are labelled 'paper', and the paper's SFD-v NFE that our SFD-v model was not
    evaluated at 'not evaluated'."""
    ours = data.rows.to_dict("records")
    labels = data.paper.get("groups", {})
    hours_col = "ours device-h" + seed_mean_label(data)
    out = []
    for e in _comparison_entries(data):
        group = labels.get(e["group"], e["group"])
        if e["source"] == "ours":
            r = e["r"]
            one_model = r.get("derived_from") or any(x.get("derived_from") == r["row_id"] for x in ours)
            out.append({"Group": group, "Method": e["method"], "NFE": "—" if e["nfe"] is None else str(e["nfe"]),
                        "Source": "ours", f"ours ({metric_label(data)})": _ours_cell(r), **_extra_cells(data, r),
                        "paper (FID)": fmt_paper(r["paper_value"]), "Δ": fmt_delta(_delta(data, r)),
                        hours_col: (fmt_hours(r["device_hours"]) if r["status"] == "ok" else "—")
                        + (" (one model)" if one_model else ""),
                        "paper A100-h": r.get("paper_hours_text") or "—",
                        "run id": _run_cell(data, r) + (f" (row {r['derived_from']})" if r.get("derived_from") else "")})
        else:
            p = e["p"]
            sfdv = _sfdv_row_of(ours, p)  # SFD-v was run, just not read at this NFE: not a paper-only method
            out.append({"Group": group, "Method": e["method"], "NFE": str(e["nfe"]),
                        "Source": "not evaluated" if sfdv else "paper",
                        f"ours ({metric_label(data)})": _not_evaluated_cell(data, sfdv) if sfdv else "—",
                        **{k: "—" for k in _extra_cells(data, {})}, "paper (FID)": fmt_paper(p["fid"]),
                        "Δ": "—", hours_col: "—", "paper A100-h": p.get("hours_text") or "—", "run id": "—"})
    return _without_empty_delta(pd.DataFrame(out))


def objective_names(data: StudyData) -> list[str]:
    return data.objective_metrics or [data.metric]


def _best_rows(data: StudyData, top: int) -> list[dict]:
    """Several objectives: the Pareto front by the first; one: the top `top` by the objective's value."""
    rows = [r for r in data.rows.to_dict("records") if r["status"] == "ok"]
    if len(objective_names(data)) > 1 and data.optuna_study is not None:
        try:
            front = {t.number for t in data.optuna_study.best_trials}
            rows = [r for r in rows if r["trial_number"] in front]
        except Exception:  # noqa: BLE001 - no front to read (e.g. no complete trial): rank what there is
            pass
        return sorted(rows, key=lambda r: (r["trial_values"] or [math.inf])[0])
    sign = -1 if (data.directions and data.directions[0] == "maximize") else 1

    def key(r):
        v = (r["trial_values"] or [None])[0]
        v = r["value"] if v is None else v
        return sign * v if is_num(v) else math.inf
    return sorted(rows, key=key)[:top]


def search_best_table(data: StudyData, top: int = 10) -> pd.DataFrame:
    """Best trials: single objective -> top-k by value; several objectives -> the Pareto front."""
    rows = _best_rows(data, top)
    names = objective_names(data)
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
            line[p] = "—" if v is None else (fmt_value(v) if is_num(v) else str(v))
        line["device-h"] = fmt_hours(r["device_hours"])
        line["run id"] = _run_cell(data, r)
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
    if data.optuna_study is None:
        return pd.DataFrame(), "Optuna study not available"
    complete = [t for t in data.optuna_study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 3:
        return pd.DataFrame(), f"only {len(complete)} completed trial(s); importances need at least 3"
    names = objective_names(data)
    n_obj = len(complete[0].values or [1])
    frames = []
    for i in range(n_obj):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(
                    data.optuna_study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                    target=(lambda t, i=i: t.values[i]) if n_obj > 1 else None)
        except Exception as exc:  # noqa: BLE001 - fANOVA refuses some studies (e.g. one value); say why
            return pd.DataFrame(), f"importances could not be computed: {exc}"
        name = names[i] if i < len(names) else f"objective {i}"
        frames.append(pd.DataFrame({"parameter": list(imp), "objective": name, "importance": list(imp.values())}))
    df = pd.concat(frames, ignore_index=True)
    return (df, None) if not df.empty else (df, "no parameter varied across completed trials")


def other_runs_table(data: StudyData) -> pd.DataFrame:
    """Every tracked attempt (including retries and rows not in the YAML) with its status."""
    out = []
    for r in data.runs.to_dict("records"):
        seed = {"seed": str(r["params"].get("seed", "—"))} if data.spec.get("seeds") else {}  # replicates
        out.append({"run id": fmt_run_id(r["run_id"], data.run_url(r["run_id"])), "row": r["row"] or "—", **seed,
                    "trial": "—" if r["trial"] is None else str(r["trial"]), "status": r["status"],
                    metric_label(data): fmt_value(to_float(r["metrics"].get(data.metric))),
                    "device-h": fmt_hours(to_float(r["metrics"].get("train/device_hours"))),
                    "error": (r["error"] or "")[:80]})
    return pd.DataFrame(out)


def report_tables(data: StudyData) -> dict[str, pd.DataFrame]:
    """The main tables of the report by title (what report.md and the notebook show)."""
    if data.kind == "ablation":
        return {"Ablation (paper's layout and order)": ablation_table(data)}
    if data.kind == "comparison":
        return {f"Comparison (paper's Table {'3' if data.paper_dataset == 'imagenet64' else '2'} layout)":
                comparison_table(data)}
    names = objective_names(data)
    title = (f"Best trials (Pareto front over {', '.join(names)})" if len(names) > 1 else
             f"Best trials (top 10 by {names[0]})")
    tables = {title: search_best_table(data)}
    imp, _ = param_importances(data)
    if not imp.empty:
        tables["Parameter importances (fANOVA, seed 0)"] = pd.DataFrame(
            {"parameter": imp["parameter"], "objective": imp["objective"],
             "importance": [f"{v:.3f}" for v in imp["importance"]]})
    return tables


def table_notes(data: StudyData) -> str:
    """What the Source column's labels mean, and the reasons too long for their cells, in full (report.md and
    the notebook print it under the tables)."""
    notes = _source_notes(data) if data.kind == "comparison" else []
    text = " ".join(notes) + "\n" if notes else ""
    reasons = long_reasons(data)
    if reasons:
        text += ("\n" if text else "") + "Reasons given in full:\n\n" + "".join(
            f"- `{r['row_id']}` ({r['status']}): {_reason(r)}\n" for r in reasons)
    return text


def _source_notes(data: StudyData) -> list[str]:
    sources = set(comparison_table(data)["Source"])
    notes = []
    if "paper" in sources:
        notes.append("Rows with Source `paper` are the paper's published numbers for methods this study did not "
                     "run; they are never measured here.")
    if "not evaluated" in sources:
        notes.append("Rows with Source `not evaluated` are NFE at which this study's SFD-v model was not evaluated"
                     + (" (a smoke run evaluates SFD-v at its own NFE and its largest only)" if data.smoke else "")
                     + "; only their paper column is filled, with the paper's number.")
    return notes


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
