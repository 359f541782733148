"""The report's text: its tables (ablation / comparison / search / all runs) as pandas frames, their markdown,
the header, and the auto-written reading of the results.

Part of the report builder (``reports/build.py``); imports only ``reports.data``."""
from __future__ import annotations

import datetime as _dt
import math
import re
import statistics
import warnings

import pandas as pd

from reports.data import (FACTORS, GROUP_LABELS, GROUP_ORDER, METRIC_DESCRIPTIONS, QUALITY_METRICS, StudyData, _canon,
                          _choose_run, _git_commit, _is_num, _lower_is_better, _to_float, _to_int, _uniq, fmt_afs,
                          fmt_delta, fmt_hours, fmt_p, fmt_paper, fmt_tmin, fmt_value)

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


def _run_cell(data: StudyData, r: dict) -> str:
    if data.spec.get("seeds") and r.get("run_id"):
        return _seed_runs_cell(data, r.get("derived_from") or r["row_id"])
    return f"`{r['run_id']}`" if r.get("run_id") else "—"


def _seed_runs_cell(data: StudyData, row_id: str) -> str:
    """Every seed's run of a replicated row, as the table's seed mean (or failure) was read from them: the
    latest finished attempt per seed, else its latest attempt, with its status when it did not finish."""
    runs = [x for x in data.runs.to_dict("records") if x["row"] == row_id]
    cells = []
    for seed in data.spec["seeds"]:
        run = _choose_run([x for x in runs if _to_int(x["params"].get("seed")) == _to_int(seed)], data.metric)
        if run is None:
            cells.append(f"seed {seed}: not run")
        else:
            status = "" if run["status"] == "FINISHED" else f", {run['status']}"
            cells.append(f"`{run['run_id']}` (seed {seed}{status})")
    return ", ".join(cells)


def _seed_mean_label(data: StudyData) -> str:
    """Cost cells of a replicated study are means over its seeds' runs; say so where they appear."""
    return " (mean over seeds)" if data.spec.get("seeds") else ""


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
                    "run id": _run_cell(data, r)})
    return pd.DataFrame(out)


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


def comparison_table(data: StudyData) -> pd.DataFrame:
    """Table 2/3 layout: our rows beside the paper's, grouped as the paper groups them; paper-only rows
    (methods we did not run) are labelled 'paper', and the paper's SFD-v NFE that our SFD-v model was not
    evaluated at 'not evaluated'."""
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
    labels = {**GROUP_LABELS, **data.paper.get("groups", {})}
    hours_col = "ours device-h" + _seed_mean_label(data)
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
                        hours_col: ours_h + (" (one model)" if r.get("derived_from") or any(
                            x.get("derived_from") == r["row_id"] for x in ours) else ""),
                        "paper A100-h": r.get("paper_hours_text") or "—",
                        "run id": _run_cell(data, r)
                        + (f" (row {r['derived_from']})" if r.get("derived_from") else "")})
        else:
            p = e["p"]
            sfdv = _sfdv_row_of(ours, p)  # SFD-v was run, just not read at this NFE: not a paper-only method
            out.append({"Group": labels.get(e["group"], e["group"]), "Method": e["method"], "NFE": str(e["nfe"]),
                        "Source": "not evaluated" if sfdv else "paper",
                        f"ours ({metric_label(data)})": _not_evaluated_cell(data, sfdv) if sfdv else "—",
                        **{k: "—" for k in _extra_cells(data, {})}, "paper (FID)": fmt_paper(p["fid"]),
                        "Δ": "—", hours_col: "—", "paper A100-h": p.get("hours_text") or "—", "run id": "—"})
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


def table_notes(data: StudyData) -> str:
    """What the Source column's labels mean (report.md and the notebook print it under the tables)."""
    if data.kind != "comparison":
        return ""
    sources = set(comparison_table(data)["Source"])
    notes = []
    if "paper" in sources:
        notes.append("Rows with Source `paper` are the paper's published numbers for methods this study did not "
                     "run; they are never measured here.")
    if "not evaluated" in sources:
        notes.append("Rows with Source `not evaluated` are NFE at which this study's SFD-v model was not evaluated"
                     + (" (a smoke run evaluates SFD-v at its own NFE and its largest only)" if data.smoke else "")
                     + "; only their paper column is filled, with the paper's number.")
    return " ".join(notes) + "\n" if notes else ""


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

def _distinct_rows(rows: list[dict]) -> list[dict]:
    """The study's rows without SFD-v's per-NFE lines (one model's runs read at other NFE, not rows of their own)."""
    return [r for r in rows if not r.get("derived_from")]


def _rows_line(rows: list[dict]) -> str:
    distinct = _distinct_rows(rows)
    counts = {s: sum(1 for r in distinct if r["status"] == s) for s in ("ok", "failed", "running", "not run")}
    lines = (f" ({len(rows)} table lines: {len(rows) - len(distinct)} more read from SFD-v's one model at other NFE)"
             if len(rows) > len(distinct) else "")
    return (f"- **Rows:** {len(distinct)}{lines} — {counts['ok']} measured, {counts['failed']} failed, "
            f"{counts['running']} running, {counts['not run']} not run")


def _training_budget(runs: list[dict]) -> str:
    """What the runs trained, by their tracked `kimg` metric, and the requested `optim.total_kimg` where it
    differs (training runs whole batches: a budget that is not a whole number of batches is rounded up)."""
    P = lambda rs, k: ", ".join(_uniq(r["params"].get(k) for r in rs)) or "—"  # noqa: E731
    trained_runs = [r for r in runs if r["status"] == "FINISHED" and _is_num(r["metrics"].get("kimg"))]
    batch, requested = P(trained_runs or runs, "optim.batch_size"), P(trained_runs or runs, "optim.total_kimg")
    if not trained_runs:
        return f"{requested} kimg at batch {batch} (requested: no finished run tracked the kimg it trained)"
    trained = ", ".join(_uniq(fmt_value(r["metrics"]["kimg"]) for r in trained_runs))
    gaps = [r["metrics"]["kimg"] - (_to_float(r["params"].get("optim.total_kimg")) or 0.0) for r in trained_runs]
    if all(abs(g) < 1e-9 for g in gaps):
        return f"{trained} kimg trained per training run at batch {batch}"
    why = "; rounded up to whole batches" if all(g >= -1e-9 for g in gaps) else ""
    return f"{trained} kimg trained per training run ({requested} requested{why}) at batch {batch}"


def _teacher_gap_line(data: StudyData, runs: list[dict]) -> list[str]:
    """The teacher gap's reference solve, as the runs tracked it (smoke runs use a cheap one)."""
    if not any("teacher_gap_mean" in r["metrics"] for r in runs):
        return []
    gap = [r for r in runs if "teacher_gap_mean" in r["metrics"]]
    solver = ", ".join(_uniq(r["params"].get("eval.gap_solver") for r in gap)) or "?"
    nfe = ", ".join(_uniq(r["params"].get("eval.gap_nfe") for r in gap)) or "?"
    smoke = (f" — a smoke setting: gaps to a {nfe}-NFE reference test the wiring and say nothing about how "
             "close a sampler gets to the teacher's accurate solution" if data.smoke else "")
    return [f"- **Teacher gap reference:** the teacher's own sample from the same noise, solved with `{solver}` "
            f"at {nfe} NFE{smoke}."]


def header_markdown(data: StudyData) -> str:
    runs = data.runs.to_dict("records")
    P = lambda k: _uniq(r["params"].get(k) for r in runs)  # noqa: E731
    T = lambda k: _uniq(r["tags"].get(k) for r in runs)  # noqa: E731
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
        _rows_line(data.rows.to_dict("records")),
        f"- **Teacher:** {', '.join(P('teacher.name')) or '—'} · **device:** {', '.join(T('sfd.device') or P('device')) or '—'}"
        f" · **precision:** {', '.join(P('precision')) or '—'}",
        f"- **Samples per evaluation:** {', '.join(samples) or '—'} · **training budget:** {_training_budget(runs)}"
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
    lines += _teacher_gap_line(data, runs)
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


def _replicated_rows(ok: list[dict]) -> list[dict]:
    """Rows with a seed spread, each counted once: SFD-v's per-NFE lines are the same runs read at other NFE."""
    return [r for r in _distinct_rows(ok) if _is_num(r.get("value_sd"))]


def seed_noise(ok: list[dict]) -> float | None:
    """Twice the median seed sd over the rows the seed moves: differences smaller than this are within the
    seed noise. None without replicates (or when no row depends on the seed)."""
    varying = [r["value_sd"] for r in _replicated_rows(ok) if r["value_sd"] > 0]
    return 2 * statistics.median(varying) if varying else None


def _within_noise(d: float, noise: float | None) -> bool:
    return noise is not None and abs(d) < noise


def _noise_caveat(d: float, noise: float | None) -> str:
    return f" This difference is within the seed noise (about {fmt_value(noise)})." if _within_noise(d, noise) else ""


def _seed_noise_reading(ok: list[dict], metric: str) -> list[str]:
    """How large a difference must be before it is more than seed noise (studies with replicate seeds). Rows
    that gave one value for every seed (solver baselines: the run seed changes only training) say nothing
    about that noise and are left out of the median."""
    replicated = _replicated_rows(ok)
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


def _rows_within_noise(ref: dict, ok: list[dict], noise: float | None) -> list[dict]:
    """The other measured table lines whose value is within the seed noise of `ref`'s."""
    return [r for r in ok if r["row_id"] != ref["row_id"] and _within_noise(r["value"] - ref["value"], noise)]


def _ties_with_best(best: dict, ok: list[dict], noise: float | None) -> str:
    close = _rows_within_noise(best, ok, noise)
    if not close:
        return ""
    names = ", ".join(f"`{r['row_id']}` {fmt_value(r['value'])}" for r in close[:6])
    names += ", …" if len(close) > 6 else ""
    return (f" It is not distinguishably the best: {len(close)} other line{'s are' if len(close) != 1 else ' is'} "
            f"within the seed noise (about {fmt_value(noise)}) of it ({names}).")


def _pairs_in_noise(pairs, noise: float | None) -> str:
    n = sum(_within_noise(b["value"] - a["value"], noise) for _, a, b in pairs
            if _is_num(a.get("value")) and _is_num(b.get("value")))
    return (f" {n} of our {len(pairs)} one-factor changes are within the seed noise (about {fmt_value(noise)})."
            if n else "")


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
        out.append(f"{len(bad)} of {len(_distinct_rows(rows))} rows have no measurement ("
                   + ", ".join(f"`{r['row_id']}`: {r['status']}" for r in bad[:8])
                   + (", …" if len(bad) > 8 else "") + "); they are left out of everything below.")
    if not ok:
        out.append("No row has a measured value yet, so there is nothing to read.")
        return out
    out += _seed_noise_reading(ok, m)
    noise = seed_noise(ok)
    if data.kind in ("ablation", "comparison"):
        if data.kind == "ablation":
            pairs = _pairs_one_factor(ok)
            ours_eff = _factor_effects(pairs, "value")
            paper_eff = _factor_effects(_pairs_one_factor(rows), "paper_value")
            if ours_eff:
                f, (d, a, b) = max(ours_eff.items(), key=lambda kv: abs(kv[1][0]))
                rel = f" ({d / a['value'] * 100:+.0f}%)" if a["value"] else ""
                if d == 0:  # nothing moved: no factor can be said to matter most
                    s = (f"**No factor moved {m} in our runs**: every pair of measured rows that differ in one "
                         f"factor alone ({', '.join(f'`{k}`' for k in ours_eff)}) gave the same {m}.")
                elif _within_noise(d, noise):
                    s = (f"**No factor moved {m} by more than the seed noise** (about {fmt_value(noise)}): the "
                         f"largest change, in `{f}`, from {_fmt_factor_value(f, a)} to {_fmt_factor_value(f, b)} "
                         f"(`{a['row_id']}` → `{b['row_id']}`), moved {m} from {fmt_value(a['value'])} to "
                         f"{fmt_value(b['value'])} (Δ {fmt_delta(d)}{rel}).")
                else:
                    s = (f"**The factor that mattered most in our runs is `{f}`**: among measured rows that differ "
                         f"in that factor alone, changing it from {_fmt_factor_value(f, a)} to "
                         f"{_fmt_factor_value(f, b)} (`{a['row_id']}` → `{b['row_id']}`) moved {m} from "
                         f"{fmt_value(a['value'])} to {fmt_value(b['value'])} (Δ {fmt_delta(d)}{rel}).")
                if d != 0 and _is_num(a.get("paper_value")) and _is_num(b.get("paper_value")):
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
                            "the paper." if order_paper[0] == order_ours[0] and d != 0 and not _within_noise(d, noise)
                            else f" The paper's most influential factor is `{order_paper[0]}`.")
                out.append(txt)
                agree = _direction_agreement(pairs, m)
                if agree:
                    tot = sum(v[1] for v in agree.values())
                    hit = sum(v[0] for v in agree.values())
                    out.append(f"**Direction of each single-factor change vs the paper:** the same sign as the "
                               f"paper's FID change on {hit} of {tot} one-factor pairs ("
                               + ", ".join(f"{f} {h}/{n}" for f, (h, n) in agree.items()) + ")."
                               + _pairs_in_noise(pairs, noise))
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
                if d == 0:
                    out.append(f"**NFE did not move {m} for any method measured at several NFE** (e.g. {meth}: "
                               f"{fmt_value(a['value'])} at NFE {a['nfe']} and at NFE {b['nfe']}).")
                else:
                    out.append(f"**NFE matters most for {meth}**: NFE {a['nfe']} → {b['nfe']} moves {m} from "
                               f"{fmt_value(a['value'])} to {fmt_value(b['value'])} (Δ {fmt_delta(d)})."
                               + _noise_caveat(d, noise))
            out.extend(_same_nfe_comparisons(data, ok, noise))
            best = min(ok, key=lambda r: r["value"] if _lower_is_better(m) else -r["value"])
            hours = (f" after {fmt_hours(best['device_hours'])} training device-hours{_seed_mean_label(data)}"
                     if _is_num(best['device_hours']) else "")
            out.append(f"Best measured row: `{best['row_id']}` ({_row_name(best, data.kind)}) with {m} = "
                       f"{fmt_value(best['value'])}{hours}.{_ties_with_best(best, ok, noise)}")
        ra = rank_agreement(data)
        if ra and ra["spearman"] is not None:
            out.append(f"**Ordering vs the paper** over the {ra['n']} rows measured by both: Spearman ρ = "
                       f"{ra['spearman']:.2f} (p {fmt_p(ra['spearman_p'])}), Kendall τ = {ra['kendall']:.2f} "
                       f"(p {fmt_p(ra['kendall_p'])}) — our ordering {_agreement_words(ra['spearman'])}. "
                       f"Our best row is `{ra['best_ours']['row_id']}`"
                       + (" (not distinguishable from other rows within the seed noise)"
                          if _rows_within_noise(ra["best_ours"], ok, noise) else "")
                       + f", the paper's best among these is `{ra['best_paper']['row_id']}`."
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


def _same_nfe_comparisons(data: StudyData, ok: list[dict], noise: float | None = None) -> list[str]:
    """Comparison reading: SFD-v (one model) against the separately distilled SFD students at each NFE, and
    the second stage against the solver rows at its NFE, on every metric the rows logged; a win within the
    seed noise (`noise`, from replicate seeds) is said to be one."""
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
        wins = [(v, s) for v, s in pairs if better(v, s)]
        clear = [(v, s) for v, s in wins if not _within_noise(v["value"] - s["value"], noise)]
        out.append("**SFD-v (one model) vs separately distilled SFD at the same NFE:** " + "; ".join(
            f"NFE {v['nfe']}: SFD-v {vals(v)} vs SFD {vals(s)}" for v, s in pairs)
                   + f". SFD-v is better by {data.metric} at {len(wins)} of {len(pairs)} NFE"
                   + (f", by more than the seed noise (about {fmt_value(noise)}) at {len(clear)} of them."
                      if len(clear) < len(wins) else "."))
    for st in by("second-stage"):
        rivals = [r for r in by("solver") if r["nfe"] == st["nfe"]]
        if rivals:
            close = [r for r in rivals if _within_noise(st["value"] - r["value"], noise)]
            out.append(f"**Second stage at {st['nfe']} NFE** (`{st['row_id']}`: {vals(st)}) vs the solver rows at "
                       f"the same NFE: " + "; ".join(f"`{r['row_id']}` {vals(r)}" for r in rivals) + " — "
                       + ("better than all of them." if all(better(st, r) for r in rivals) else
                          "not better than all of them.") + f" (by {data.metric})"
                       + (f" Within the seed noise (about {fmt_value(noise)}) of "
                          + ", ".join(f"`{r['row_id']}`" for r in close) + "." if close else ""))
    return out


def reading_markdown(data: StudyData) -> str:
    return "## Reading of the results (auto-written)\n\n" + "\n\n".join(reading(data)) + "\n"
