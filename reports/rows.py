"""Which run each table line shows, and the line itself: its labels, status, value, cost and paper number.

A table study's row (and each seed of it) shows the trial the study itself shows: `sfd.study.shown_trial`, its
latest complete trial, else its latest; a retry still queued does not hide the attempt it retries, it is noted.
A search shows one line per trial. Runs and trials come in flattened (`reports.loading` reads them); a run
whose trial is not on record (the Optuna study could not be read) is still an attempt, with its status as
its state.

Part of the report builder (``reports/build.py``); imports ``reports.formatting`` and ``reports.paper``."""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

from optuna.trial import TrialState

from reports.formatting import LOSS_NAMES, METHOD_NAMES, solver_name, to_bool, to_float, to_int
from reports.paper import paper_row
from sfd.metrics.names import QUALITY_KEYS, training_cost
from sfd.study import shown_trial
from sfd.tracking import TAG_ERROR, TAG_ROW, TAG_SMOKE_NOTE

# The table group of each algorithm, as the paper groups its comparison tables.
ALGORITHM_GROUP = {"sfd": "sfd", "sfd-v": "sfd-v", "sfdv": "sfd-v", "second-stage": "second-stage",
                   "second_stage": "second-stage", "vanilla": "distillation", "baseline": "solver",
                   "solver": "solver", "none": "solver"}
# A run's status read as a trial state, for runs whose trial is not on record.
RUN_STATES = {"FINISHED": TrialState.COMPLETE, "RUNNING": TrialState.RUNNING, "SCHEDULED": TrialState.RUNNING}


@dataclass
class Attempt:
    """One try at a row (one seed of it): its Optuna trial, its MLflow run, or both. `state` is all that
    `shown_trial` reads; the list order it relies on is trial order (`number`)."""
    state: TrialState
    number: float
    trial: dict | None = None
    run: dict | None = None


def attempts_by_row(runs: list[dict], trials: list[dict], seeded: bool) -> dict[tuple, list[Attempt]]:
    """Every attempt of each (row, seed) key in trial order (seed None unless the study has replicates). A
    trial names its row and seed (user attributes); a run, by its `sfd.row` tag and its `seed` param."""
    by_id = {r["run_id"]: r for r in runs}
    out: dict[tuple, list[Attempt]] = {}
    linked = set()
    for t in trials:
        run = by_id.get(t["mlflow_run_id"])
        linked.add(t["mlflow_run_id"])
        out.setdefault(_key(t, run, seeded), []).append(Attempt(TrialState[t["state"]], t["number"], t, run))
    for r in runs:
        if r["run_id"] not in linked:
            number = math.inf if r.get("trial_number") is None else r["trial_number"]
            state = RUN_STATES.get(r["status"], TrialState.FAIL)
            out.setdefault(_key(None, r, seeded), []).append(Attempt(state, number, None, r))
    for attempts in out.values():
        attempts.sort(key=lambda a: (a.number, (a.run or {}).get("start_time") or 0))
    return out


def _key(trial: dict | None, run: dict | None, seeded: bool) -> tuple:
    row = (trial or {}).get("row") or (run["tags"].get(TAG_ROW) if run else None)
    seed = (trial or {}).get("seed") if seeded else None
    if seeded and seed is None and run is not None:
        seed = to_int(run["params"].get("seed"))
    return row, seed


def shown_attempt(attempts: list[Attempt]) -> Attempt | None:
    """The attempt a row shows: `shown_trial` over the started ones (a queued retry does not hide what it
    retries), else the queued one (a row not run yet), else None."""
    started = [a for a in attempts if a.state != TrialState.WAITING]
    return shown_trial(started) or shown_trial(attempts)


# ----- the lines of a table study --------------------------------------------------------------------------

def row_lines(spec: dict, runs: list[dict], trials: list[dict], skipped: dict[str, str], metric: str,
              paper: dict, paper_dataset: str, kind: str) -> list[dict]:
    """One line per row of the study YAML, in its order (SFD-v rows add a line per other NFE)."""
    seeds = spec.get("seeds") or None
    attempts = attempts_by_row(runs, trials, bool(seeds))
    skipped = {**{str(k): str(v) for k, v in (spec.get("skip_rows") or {}).items()}, **skipped}
    lines = []
    for order, srow in enumerate(spec["rows"]):
        rid = str(srow.get("id", order))
        mine = [a for (row, _), some in attempts.items() if row == rid for a in some]
        shown = (_replicated([shown_attempt(attempts.get((rid, s), [])) for s in seeds], metric) if seeds
                 else shown_attempt(mine))
        run, trial = (shown.run, shown.trial) if shown else (None, None)
        line = make_line(order, rid, srow, run, trial, metric, sum(a.run is not None for a in mine), paper,
                         paper_dataset, kind)
        if seeds:
            line["seed_runs"] = [_seed_run(s, shown_attempt(attempts.get((rid, s), []))) for s in seeds]
        if line["status"] == "failed" and any(a.state == TrialState.WAITING for a in mine):
            line["reason"] = f"{line['reason']} (queued again)"
        if line["status"] == "not run" and rid in skipped:
            line["reason"] = f"skipped: {skipped[rid]}"
        lines += [line, *_per_nfe_lines(line, run, metric, paper, paper_dataset, kind)]
    return lines


def _seed_run(seed: int, attempt: Attempt | None) -> tuple[int, str | None, str | None]:
    """(seed, run id, run status) of the run a replicated row shows for one seed; (seed, None, None) if none."""
    run = attempt.run if attempt else None
    return seed, (run or {}).get("run_id"), (run or {}).get("status")


def _replicated(per_seed: list[Attempt | None], metric: str) -> Attempt | None:
    """A row run once per seed: the attempt each seed shows, merged into one whose run's metrics are the means
    over the seeds that finished; `replicates` keeps each seed's run id and values for the ± and the links.
    When no seed finished, the row shows the latest of its seeds' attempts."""
    chosen = sorted((a for a in per_seed if a is not None), key=lambda a: a.number)
    ok = [a for a in chosen if a.run is not None and a.run["status"] == "FINISHED"]
    if not ok:
        return shown_trial(chosen)
    runs = [a.run for a in ok]
    shared = set.intersection(*(set(r["metrics"]) for r in runs))
    means = {k: statistics.fmean(float(r["metrics"][k]) for r in runs) for k in shared}
    merged = {**runs[0], "metrics": means, "replicates": {
        "seeds": [to_int(r["params"].get("seed")) for r in runs], "run_ids": [r["run_id"] for r in runs],
        "values": [to_float(r["metrics"].get(metric)) for r in runs], "expected": len(per_seed),
        "metrics": [r["metrics"] for r in runs]}}
    return Attempt(ok[0].state, ok[0].number, ok[0].trial, merged)


def skipped_rows(text: str, row_ids: set[str]) -> dict[str, str]:
    """Rows the runner skipped for a missing asset (the parent's `sfd.skipped_rows` tag: 'id: reason; ...')."""
    out: dict[str, str] = {}
    current = None
    for part in (text or "").split("; "):
        rid, sep, reason = part.partition(": ")
        if sep and rid in row_ids:
            current = rid
            out[rid] = reason
        elif current is not None:  # a reason that itself contained '; '
            out[current] += "; " + part
    return out


# ----- the lines of a search -------------------------------------------------------------------------------

def trial_lines(runs: list[dict], trials: list[dict], metric: str, paper: dict, paper_dataset: str,
                kind: str) -> list[dict]:
    """One line per trial in trial order (a trial whose run is not among `runs` is left out), then one per
    run that no trial names."""
    by_id = {r["run_id"]: r for r in runs}
    by_number = {t["number"]: t for t in trials}
    lines, seen = [], set()
    for t in sorted(trials, key=lambda t: t["number"]):
        run = by_id.get(t["mlflow_run_id"])
        if run is None and t["mlflow_run_id"]:
            continue  # that trial's run is a smoke run or belongs elsewhere
        seen.add(t["mlflow_run_id"])
        rid = (run["tags"].get(TAG_ROW) if run else None) or f"trial-{t['number']}"
        lines.append(make_line(len(lines), rid, {}, run, t, metric, 1, paper, paper_dataset, kind))
    for r in runs:
        if r["run_id"] not in seen:
            rid = r["tags"].get(TAG_ROW) or f"trial-{r.get('trial_number')}"
            lines.append(make_line(len(lines), rid, {}, r, by_number.get(r.get("trial_number")), metric, 1, paper,
                                   paper_dataset, kind))
    return lines


# ----- one line ----------------------------------------------------------------------------------------------

def make_line(order, rid, srow, run, trial, metric, attempts, paper, paper_dataset, kind) -> dict:
    """A table line: the row's labels, the shown run's status and values, and the paper's number for it."""
    params = run["params"] if run else {}
    metrics = run["metrics"] if run else {}
    labels = row_labels(srow, params)
    prow = paper_row(srow, labels, paper, paper_dataset, kind)  # by the row's own labels, before the run's
    status, reason = status_of(run, trial, metric)
    ok = status == "ok"
    if run and run["tags"].get(f"{TAG_SMOKE_NOTE}loss.name") and labels["loss"]:  # the smoke run swapped its loss
        trained = LOSS_NAMES.get(str(params.get("loss.name")).lower(), params.get("loss.name"))
        labels["loss"] = f"{labels['loss']} (smoke run trained {trained}: weights not installed)"
    # NFE as the run accounted it (guidance doubles it); the student's own NFE stays the ablation factor
    labels["student_nfe"] = labels["nfe"]
    if ok and to_int(metrics.get("nfe")) is not None:
        labels["nfe"] = to_int(metrics["nfe"])
    extra = {m: to_float(metrics.get(m)) for m in QUALITY_KEYS
             if m != metric and ok and to_float(metrics.get(m)) is not None}
    return {"order": order, "row_id": rid, **labels, "extra": extra, "derived_from": None,
            "paper_key": prow["key"] if prow else srow.get("paper_key"),
            "status": status, "reason": reason, "run_id": run["run_id"] if run else None,
            "run_status": run["status"] if run else None,
            "trial_number": (trial or {}).get("number", run.get("trial_number") if run else None),
            "trial_state": (trial or {}).get("state"), "attempts": attempts,
            "value": to_float(metrics.get(metric)) if ok else None, "objective": to_float(metrics.get("objective")),
            "trial_values": (trial or {}).get("values"), "trial_params": (trial or {}).get("params") or {},
            "device_hours": to_float(training_cost(metrics)) if ok else None,  # processor time, comparable
            "train_wall_s": to_float(metrics.get("train/wall_s")),
            "eval_samples": to_int(metrics.get("eval/num_samples", params.get("eval.num_samples"))),
            "teacher_name": params.get("teacher.name"), "algorithm": params.get("algorithm"), "params": params,
            **_paper_fields(prow), **_replicate_fields(run, status)}


def _paper_fields(prow: dict | None) -> dict:
    return {"paper_value": to_float(prow.get("fid")) if prow else None,
            "paper_hours": to_float(prow.get("hours")) if prow else None,
            "paper_hours_text": prow.get("hours_text") if prow else None}


def row_labels(row: dict, params: dict) -> dict:
    """Table labels of a row: explicit fields of the study row, else its params, else the run's params."""
    rp = {**params, **(row.get("params") or {})}

    def pick(field_, *keys):
        if row.get(field_) is not None:
            return row[field_]
        return next((rp[k] for k in keys if rp.get(k) not in (None, "", "None")), None)

    def named(field_, names, *keys):  # a run's param shown by its display name; the YAML's label as written
        value = pick(field_, *keys)
        return names(value) if value is not None and row.get(field_) is None else value

    group = row.get("group")
    if group is None:
        algo = str(rp.get("algorithm", "")).lower()
        group = ALGORITHM_GROUP.get(algo) if algo else None
    return {"method": named("method", lambda v: METHOD_NAMES.get(str(v).lower(), v), "algorithm"),
            "teacher": named("teacher", solver_name, "solver.name", "teacher.solver"),
            "t_min": to_float(pick("t_min", "student.t_min")),
            "afs": to_bool(row["afs"] if "afs" in row else pick("afs", "student.afs")),
            "loss": named("loss", lambda v: LOSS_NAMES.get(str(v).lower(), v), "loss.name"),
            "nfe": to_int(pick("nfe", "student.nfe", "nfe")), "group": group,
            "guidance": to_float(pick("guidance", "student.guidance"))}


def status_of(run: dict | None, trial: dict | None, metric: str) -> tuple[str, str | None]:
    """(ok | failed | running | not run, why) of the run a line shows."""
    state = (trial or {}).get("state")
    if run is None:
        if state == "FAIL":
            return "failed", trial.get("fail_reason") or "trial failed before its MLflow run was created"
        return ("running", None) if state == "RUNNING" else ("not run", None)
    error = run["tags"].get(TAG_ERROR)
    if run["status"] == "FAILED":
        return "failed", error or (trial or {}).get("fail_reason") or "run FAILED (no sfd.error tag)"
    if run["status"] in ("RUNNING", "SCHEDULED"):
        if state == "RUNNING":
            return "running", "or interrupted: re-running the study resumes it"
        return "failed", "interrupted: run never finished"
    if run["status"] == "KILLED":
        return "failed", error or "run KILLED"
    if to_float(run["metrics"].get(metric)) is None:
        return "failed", f"metric {metric!r} not logged"
    return "ok", None


def _replicate_fields(run: dict | None, status: str) -> dict:
    """n, sd and per-seed run ids of a replicated row (a study with `seeds:`); nothing for a single run."""
    rep = (run or {}).get("replicates")
    if not rep or status != "ok":
        return {}
    values = [v for v in rep["values"] if v is not None]
    return {"n_seeds": len(values), "seeds_expected": rep["expected"], "seed_run_ids": rep["run_ids"],
            "seeds": rep["seeds"], "value_sd": _sd(values),
            "extra_sd": {m: _seed_sd(rep["metrics"], m) for m in QUALITY_KEYS}}


def _sd(values: list[float]) -> float | None:
    """Sample sd over seeds; None below two values."""
    return statistics.stdev(values) if len(values) > 1 else None


def _seed_sd(per_seed_metrics: list[dict], key: str) -> float | None:
    """The sd over seeds of one logged metric (seeds that did not log it are left out)."""
    values = [to_float(m.get(key)) for m in per_seed_metrics]
    return _sd([v for v in values if v is not None])


def _per_nfe_lines(line: dict, run: dict | None, metric: str, paper: dict, paper_dataset: str,
                   kind: str) -> list[dict]:
    """An SFD-v run (one model) also logged `<metric>/nfe_<k>` at its other trained NFE: one more table line
    per NFE, as the paper shows SFD-v, marked as derived from the row (same run, same training cost)."""
    if run is None or line["status"] != "ok":
        return []
    per_seed = (run.get("replicates") or {}).get("metrics") or []
    pattern = re.compile(rf"{re.escape(metric)}/nfe_(\d+)")
    nfes = sorted(int(m.group(1)) for k in run["metrics"] if (m := pattern.fullmatch(k)))
    out = []
    for k in nfes:
        if k == line["nfe"]:
            continue
        new = {**line, "row_id": f"{line['row_id']}@nfe{k}", "nfe": k, "student_nfe": k,
               "derived_from": line["row_id"], "value_sd": _seed_sd(per_seed, f"{metric}/nfe_{k}"),
               "extra_sd": {m: _seed_sd(per_seed, f"{m}/nfe_{k}") for m in QUALITY_KEYS},
               "value": to_float(run["metrics"][f"{metric}/nfe_{k}"]),
               "extra": {m: to_float(run["metrics"][f"{m}/nfe_{k}"]) for m in line["extra"]
                         if f"{m}/nfe_{k}" in run["metrics"]}}
        prow = _paper_row_at_nfe(line, new, k, paper, paper_dataset, kind)
        new.update({"paper_key": prow["key"] if prow else None, **_paper_fields(prow)})
        out.append(new)
    return out


def _paper_row_at_nfe(line: dict, new: dict, nfe: int, paper: dict, paper_dataset: str, kind: str) -> dict | None:
    """The paper's row for an SFD-v line at another NFE: its row's paper key at that NFE, or a label match."""
    key = line.get("paper_key")
    if key and re.search(rf"/{line['nfe']}$", str(key)):
        return paper["index"].get(re.sub(r"/\d+$", f"/{nfe}", str(key)))
    if not key:
        return paper_row({"id": new["row_id"]}, new, paper, paper_dataset, kind)
    return None
