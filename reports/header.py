"""The report's header: what the study is, where its runs are, what they ran with and what the metric and the
paper column mean, as the tracked runs say.

Part of the report builder (``reports/build.py``); imports ``reports.formatting`` and ``reports.loading``."""
from __future__ import annotations

import datetime as dt

from reports.formatting import fmt_hours, fmt_value, is_num, lower_is_better, to_float, to_int, uniq
from reports.loading import StudyData
from sfd import tracking as T
from sfd.metrics.names import COST_LABEL, DESCRIPTIONS, training_cost


def distinct_rows(rows: list[dict]) -> list[dict]:
    """The study's rows without SFD-v's per-NFE lines (one model's runs read at other NFE, not rows of their own)."""
    return [r for r in rows if not r.get("derived_from")]


def _rows_line(rows: list[dict]) -> str:
    distinct = distinct_rows(rows)
    counts = {s: sum(1 for r in distinct if r["status"] == s) for s in ("ok", "failed", "running", "not run")}
    lines = (f" ({len(rows)} table lines: {len(rows) - len(distinct)} more read from SFD-v's one model at other NFE)"
             if len(rows) > len(distinct) else "")
    return (f"- **Rows:** {len(distinct)}{lines} — {counts['ok']} measured, {counts['failed']} failed, "
            f"{counts['running']} running, {counts['not run']} not run")


def _joined(runs: list[dict], key: str, where: str = "params") -> str:
    """The distinct values of a param (or tag) over the runs, comma-separated."""
    return ", ".join(uniq(r[where].get(key) for r in runs))


def _training_budget(runs: list[dict]) -> str:
    """What the runs trained, by their tracked `kimg` metric, and the requested `optim.total_kimg` where it
    differs (training runs whole batches: a budget that is not a whole number of batches is rounded up)."""
    trained_runs = [r for r in runs if r["status"] == "FINISHED" and is_num(r["metrics"].get("kimg"))]
    batch = _joined(trained_runs or runs, "optim.batch_size") or "—"
    requested = _joined(trained_runs or runs, "optim.total_kimg") or "—"
    if not trained_runs:
        return f"{requested} kimg at batch {batch} (requested: no finished run tracked the kimg it trained)"
    trained = ", ".join(uniq(fmt_value(r["metrics"]["kimg"]) for r in trained_runs))
    gaps = [r["metrics"]["kimg"] - (to_float(r["params"].get("optim.total_kimg")) or 0.0) for r in trained_runs]
    if all(abs(g) < 1e-9 for g in gaps):
        return f"{trained} kimg trained per training run at batch {batch}"
    why = "; rounded up to whole batches" if all(g >= -1e-9 for g in gaps) else ""
    return f"{trained} kimg trained per training run ({requested} requested{why}) at batch {batch}"


def _teacher_gap_line(data: StudyData, runs: list[dict]) -> list[str]:
    """The teacher gap's reference solve, as the runs tracked it (smoke runs use a cheap one)."""
    gap = [r for r in runs if "teacher_gap_mean" in r["metrics"]]
    if not gap:
        return []
    solver = _joined(gap, "eval.gap_solver") or "?"
    nfe = _joined(gap, "eval.gap_nfe") or "?"
    smoke = (f" — a smoke setting: gaps to a {nfe}-NFE reference test the wiring and say nothing about how "
             "close a sampler gets to the teacher's accurate solution" if data.smoke else "")
    return [f"- **Teacher gap reference:** the teacher's own sample from the same noise, solved with `{solver}` "
            f"at {nfe} NFE{smoke}."]


def _commits(runs: list[dict]) -> list[str]:
    """The runs' commits (12 characters), marked when the checkout had local edits."""
    out = []
    for r in runs:
        c = r["tags"].get(T.TAG_GIT_COMMIT)
        if c:
            c = c[:12] + (" (dirty)" if str(r["tags"].get(T.TAG_GIT_DIRTY, "")).lower() == "true" else "")
            if c not in out:
                out.append(c)
    return out


def _samples(runs: list[dict]) -> list[str]:
    logged = uniq(fmt_value(r["metrics"]["eval/num_samples"]) for r in runs if "eval/num_samples" in r["metrics"])
    return logged or uniq(r["params"].get("eval.num_samples") for r in runs)


def _provenance_line(runs: list[dict]) -> str:
    built = T.git_info()[T.TAG_GIT_COMMIT]
    versions = {dist: _joined(runs, f"{T.TAG_VERSION}{dist}", "tags") or "—" for dist in ("sfd", "torch")}
    return (f"- **Git commit of the runs:** {', '.join(_commits(runs)) or '—'} · versions: sfd {versions['sfd']}, "
            f"torch {versions['torch']} · report built at commit {'—' if built == 'unknown' else built[:12]}, "
            f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}")


def _metric_line(metric: str) -> str:
    description = DESCRIPTIONS.get(metric, "objective: the study's objective value" if metric == "objective" else metric)
    return (f"- **Metric:** `{metric}` — {description}"
            + (" (lower is better)" if lower_is_better(metric) else " (higher is better)"))


def _paper_line(data: StudyData, runs: list[dict], samples: list[str]) -> str:
    if data.comparable:
        n = to_int(samples[0]) if samples else None
        extra = (f" FID here uses {n} samples, the paper 50k: small-sample FID is biased upward, so Δ is "
                 f"indicative." if n and n < 50000 else "")
        return (f"- **Paper column:** the paper's published FID ({data.paper_dataset}), from "
                f"`reports/paper_numbers.yaml`; Δ = ours − paper.{extra}")
    why = ("these are smoke runs (random teacher, tiny budget): they test the wiring, not the method"
           if data.smoke else f"our metric is `{data.metric}` on teacher "
           f"{_joined(runs, 'teacher.name') or '?'}, the paper's is FID on {data.paper_dataset}")
    return (f"- **Paper column:** the paper's published FID ({data.paper_dataset}) from "
            f"`reports/paper_numbers.yaml`, **for orientation only** — {why}. Δ is not computed across "
            f"different metrics; compare the ordering of rows, not the values.")


def _cost_line(runs: list[dict]) -> str:
    """The study's total cost: processor time (comparable whatever else the machine ran) and wall time."""
    costs = [training_cost(r["metrics"]) for r in runs]
    known = [c for c in costs if c is not None]
    unknown = len(costs) - len(known)
    return (f"- **Total {COST_LABEL}:** {fmt_hours(sum(known)) if known else '—'}"
            + (f" (not counted: {unknown} run(s) logged before the cost was processor time)" if unknown else "")
            + f" · **total wall time:** {fmt_value(sum(r['metrics'].get('total/wall_s', 0.0) for r in runs) / 60)} min")


def header_markdown(data: StudyData) -> str:
    runs = data.runs.to_dict("records")
    samples = _samples(runs)
    states = ", ".join(f"{k} {v}" for k, v in data.trials["state"].value_counts().items()) or "none"
    lines = [f"# Report: `{data.study}`" + (" — SMOKE RUNS" if data.smoke else ""), ""]
    if data.spec.get("description"):
        lines += [str(data.spec["description"]).strip(), ""]
    lines += [
        f"- **Kind:** {data.kind} · **MLflow experiment:** `{data.experiment_name}` · "
        f"**parent run:** `{data.parent['run_id']}` · tracking URI `{data.tracking_uri}`",
        f"- **Optuna study:** `{data.parent['tags'].get(T.TAG_OPTUNA_STUDY, data.study)}` in `{data.storage}` · "
        f"trials: {len(data.trials)} ({states})",
        _rows_line(data.rows.to_dict("records")),
        f"- **Teacher:** {_joined(runs, 'teacher.name') or '—'} · **device:** "
        f"{_joined(runs, T.TAG_DEVICE, 'tags') or _joined(runs, 'device') or '—'}"
        f" · **precision:** {_joined(runs, 'precision') or '—'}",
        f"- **Samples per evaluation:** {', '.join(samples) or '—'} · **training budget:** {_training_budget(runs)}"
        + (f" · **trials budget:** {data.spec.get('n_trials')}" if data.spec.get("n_trials") else ""),
        _cost_line(runs),
        _provenance_line(runs), _metric_line(data.metric), *_teacher_gap_line(data, runs)]
    if data.objective_metrics:
        lines.append(f"- **Objective:** {', '.join(data.objective_metrics)} "
                     f"({', '.join(data.directions) or 'minimize'})")
    lines.append(_paper_line(data, runs, samples))
    note = data.paper["ablation"].get("note") if data.kind == "ablation" else None
    if note:
        lines.append(f"- **Paper's ablation NFE:** {' '.join(str(note).split())}")
    lines += [f"- Note: {n}" for n in data.notes]
    return "\n".join(lines) + "\n"
