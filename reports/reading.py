"""The report's written reading: what the tracked values support, in words. Single-factor changes and their
direction against the paper's, the ordering against the paper's, the seed noise (from replicate seeds, or the
caveat of a single seed), the comparison's same-NFE contests, and a search's importances and best trial.

Part of the report builder (``reports/build.py``); imports ``reports.formatting``, ``reports.loading``,
``reports.tables`` and ``reports.header``."""
from __future__ import annotations

import math
import statistics
import warnings

from scipy import stats

from reports.formatting import (canon, fmt_afs, fmt_delta, fmt_hours, fmt_p, fmt_paper, fmt_tmin, fmt_value, is_num,
                                lower_is_better, to_float)
from reports.header import distinct_rows
from reports.loading import StudyData
from reports.tables import FACTORS, extra_metrics, objective_names, param_importances, search_best_table, seed_mean_label

# How far one run moves with its seed where that was measured, for single-seed readings: on the embedded digits
# teacher at the ablation's budget, the same row ranged 12.7-15.2 fd_digits between runs that differed only in
# the seed, so single-seed differences under about 3 are not reliable (reports/RESULTS.md, "One seed").
SINGLE_SEED_NOISE = {"fd_digits": 3.0}
# The paper's choices a search's best trial is checked against: (config key, the paper's value, how to say it).
PAPER_CHOICES = (("solver.name", "dpmpp3m", "teacher DPM++(3M)"), ("student.t_min", "0.006", "t_min = 0.006"),
                 ("student.afs", "true", "AFS on"), ("loss.name", "l1", "L1 loss"))


def reading_markdown(data: StudyData) -> str:
    return "## Reading of the results (auto-written)\n\n" + "\n\n".join(reading(data)) + "\n"


def reading(data: StudyData) -> list[str]:
    """Auto-written reading of the results, as a list of markdown paragraphs."""
    rows = data.rows.to_dict("records")
    out: list[str] = []
    if data.smoke:
        out.append("_These are smoke runs (randomly initialised teacher, tiny budget): the reading below is "
                   "produced by the same code as for real runs but says nothing about SFD._")
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        out.append(f"{len(bad)} of {len(distinct_rows(rows))} rows have no measurement ("
                   + ", ".join(f"`{r['row_id']}`: {r['status']}" for r in bad[:8])
                   + (", …" if len(bad) > 8 else "") + "); they are left out of everything below.")
    if not ok:
        return out + ["No row has a measured value yet, so there is nothing to read."]
    out += _seed_noise_reading(ok, data.metric) or _single_seed_reading(data, ok)
    if data.kind == "search":
        return out + _search_reading(data)
    noise = seed_noise(ok)
    out += _ablation_reading(data, rows, ok, noise) if data.kind == "ablation" else _comparison_reading(data, ok, noise)
    return out + _ordering_reading(data, ok, noise)


# ----- seed noise --------------------------------------------------------------------------------------------

def _replicated_rows(ok: list[dict]) -> list[dict]:
    """Rows with a seed spread, each counted once: SFD-v's per-NFE lines are the same runs read at other NFE."""
    return [r for r in distinct_rows(ok) if is_num(r.get("value_sd"))]


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


def _single_seed_reading(data: StudyData, ok: list[dict]) -> list[str]:
    """Each row (trial) ran with one seed: say so, and how far a run moves with its seed where that is known."""
    if any(is_num(r.get("n_seeds")) for r in ok):
        return []
    m = data.metric
    known = SINGLE_SEED_NOISE.get(m) if _teacher_is_digits(data) else None
    size = (f"On the digits teacher one run moves by up to about {fmt_value(known)} {m} with its seed, so "
            f"differences smaller than that are not reliable." if known is not None else
            f"How far one run moves with its seed has not been measured for {m} here, so small differences may "
            f"be seed noise.")
    if data.kind == "search":
        return [f"**Single seed:** each trial ran once, with one seed, so the best trial and the importances below "
                f"rest on one run per trial. {size}"]
    return [f"**Single seed:** each row ran once, with one seed, so every comparison below rests on one run per "
            f"row. {size} Running the study with `--seeds 0 1 2` measures that noise and marks every comparison "
            f"within it."]


def _teacher_is_digits(data: StudyData) -> bool:
    teachers = {str(p.get("teacher.name", "")) for p in data.runs["params"]} if len(data.runs) else set()
    return bool(teachers) and all(t.startswith("digits") for t in teachers)


# ----- an ablation: one factor at a time -----------------------------------------------------------------------

def _pairs_one_factor(rows: list[dict]) -> list[tuple[str, dict, dict]]:
    """Every pair of lines that differ in exactly one factor: (factor, first, second) in table order."""
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
        return canon(v)
    pairs = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            diff = [f for f in FACTORS if key(a, f) != key(b, f)]
            if len(diff) == 1:
                pairs.append((diff[0], a, b))
    return pairs


def _factor_effects(pairs, field_: str) -> dict[str, tuple[float, dict, dict]]:
    """Per factor, its largest change of `field_` over the pairs: (change, first, second)."""
    best: dict[str, tuple[float, dict, dict]] = {}
    for f, a, b in pairs:
        va, vb = a.get(field_), b.get(field_)
        if not (is_num(va) and is_num(vb)):
            continue
        d = vb - va
        if f not in best or abs(d) > abs(best[f][0]):
            best[f] = (d, a, b)
    return best


def _same_direction(ours_delta: float, paper_delta: float, metric: str) -> bool | None:
    """Do our change and the paper's FID change point the same way (both better or both worse)?"""
    if ours_delta == 0 or paper_delta == 0:
        return None
    ours_better = ours_delta < 0 if lower_is_better(metric) else ours_delta > 0
    return ours_better == (paper_delta < 0)


def _pair_direction(a: dict, b: dict, metric: str) -> bool | None:
    """Our change from `a` to `b` against the paper's for the same pair (None without both paper values)."""
    if not (is_num(a.get("paper_value")) and is_num(b.get("paper_value"))):
        return None
    return _same_direction(b["value"] - a["value"], b["paper_value"] - a["paper_value"], metric)


def _direction_agreement(pairs, metric: str) -> dict[str, tuple[int, int]]:
    """Per factor: (pairs whose change has the paper's sign, pairs with both values), in FACTORS order."""
    out: dict[str, list[int]] = {}
    for f, a, b in pairs:
        if not all(is_num(x) for x in (a.get("value"), b.get("value"))):
            continue
        same = _pair_direction(a, b, metric)
        if same is None:
            continue
        hit_n = out.setdefault(f, [0, 0])
        hit_n[0] += int(same)
        hit_n[1] += 1
    return {f: tuple(out[f]) for f in FACTORS if f in out}


def _fmt_factor_value(f: str, r: dict) -> str:
    return fmt_afs(r["afs"]) if f == "afs" else (fmt_tmin(r["t_min"]) if f == "t_min" else str(r.get(f)))


def _ablation_reading(data: StudyData, rows: list[dict], ok: list[dict], noise: float | None) -> list[str]:
    pairs = _pairs_one_factor(ok)
    ours = _factor_effects(pairs, "value")
    if not ours:
        return ["No two measured rows differ in exactly one factor, so no single factor can be isolated."]
    paper = _factor_effects(_pairs_one_factor(rows), "paper_value")
    out = [_largest_factor(data, ours, noise), _factor_ranking(data, ours, paper, noise)]
    agree = _direction_agreement(pairs, data.metric)
    if agree:
        tot = sum(v[1] for v in agree.values())
        hit = sum(v[0] for v in agree.values())
        out.append(f"**Direction of each single-factor change vs the paper:** the same sign as the paper's FID "
                   f"change on {hit} of {tot} one-factor pairs (" + ", ".join(f"{f} {h}/{n}" for f, (h, n) in
                                                                           agree.items()) + ")."
                   + _pairs_in_noise(pairs, noise))
    return out


def _largest_factor(data: StudyData, ours: dict, noise: float | None) -> str:
    """The factor whose one-factor change moved our metric most, and which way the paper's FID went there."""
    m = data.metric
    f, (d, a, b) = max(ours.items(), key=lambda kv: abs(kv[1][0]))
    rel = f" ({d / a['value'] * 100:+.0f}%)" if a["value"] else ""
    change = (f"from {_fmt_factor_value(f, a)} to {_fmt_factor_value(f, b)} (`{a['row_id']}` → `{b['row_id']}`) "
              f"moved {m} from {fmt_value(a['value'])} to {fmt_value(b['value'])} (Δ {fmt_delta(d)}{rel})")
    if d == 0:  # nothing moved: no factor can be said to matter most
        return (f"**No factor moved {m} in our runs**: every pair of measured rows that differ in one factor alone "
                f"({', '.join(f'`{k}`' for k in ours)}) gave the same {m}.")
    if _within_noise(d, noise):
        s = (f"**No factor moved {m} by more than the seed noise** (about {fmt_value(noise)}): the largest change, "
             f"in `{f}`, {change}.")
    else:
        s = (f"**The factor that mattered most in our runs is `{f}`**: among measured rows that differ in that "
             f"factor alone, changing it {change}.")
    same = _pair_direction(a, b, m)
    if is_num(a.get("paper_value")) and is_num(b.get("paper_value")):
        s += (f" The paper's FID for the same pair goes {fmt_paper(a['paper_value'])} → {fmt_paper(b['paper_value'])}"
              + (" (the same direction)." if same else " (the opposite direction)." if same is False else "."))
    return s


def _factor_ranking(data: StudyData, ours: dict, paper: dict, noise: float | None) -> str:
    """Each factor's largest change, ours and the paper's, and whether the most influential factor agrees: the
    same factor moving the metric the other way on our pair is said to disagree, not to agree."""
    order_ours = sorted(ours, key=lambda k: -abs(ours[k][0]))
    txt = "Largest single-factor change per factor, ours: " + ", ".join(
        f"{k} {fmt_delta(ours[k][0])}" for k in order_ours) + "."
    if not paper:
        return txt
    order_paper = sorted(paper, key=lambda k: -abs(paper[k][0]))
    txt += " Paper (same rows, FID): " + ", ".join(f"{k} {fmt_delta(paper[k][0])}" for k in order_paper) + "."
    top, (d, a, b) = order_ours[0], ours[order_ours[0]]
    if order_paper[0] != top or d == 0 or _within_noise(d, noise):
        return txt + f" The paper's most influential factor is `{order_paper[0]}`."
    same = _pair_direction(a, b, data.metric)
    if same is False:
        return txt + (f" The paper's most influential factor is also `{top}`, but on our pair above it moves the "
                      f"other way (ours {fmt_delta(d)} {data.metric}, the paper's "
                      f"{fmt_delta(b['paper_value'] - a['paper_value'])} FID): the same factor with the opposite "
                      f"effect, not an agreement.")
    if same is None:
        return txt + (f" The paper's most influential factor is also `{top}`; the paper has no FID for our pair, so "
                      f"the direction of its effect is not compared.")
    return txt + " By the size of its largest change, the most influential factor is the same as in the paper."


def _pairs_in_noise(pairs, noise: float | None) -> str:
    n = sum(_within_noise(b["value"] - a["value"], noise) for _, a, b in pairs
            if is_num(a.get("value")) and is_num(b.get("value")))
    return (f" {n} of our {len(pairs)} one-factor changes are within the seed noise (about {fmt_value(noise)})."
            if n else "")


# ----- a comparison: NFE and same-NFE contests ------------------------------------------------------------------

def _row_name(r: dict, kind: str = "ablation") -> str:
    if kind == "comparison" and r.get("method") and r.get("nfe") is not None:
        return f"{r['method']} · NFE {r['nfe']}"
    parts = [r.get("method"), r.get("teacher"), None if r.get("t_min") is None else f"t_min={fmt_tmin(r['t_min'])}",
             None if r.get("afs") is None else ("AFS" if r["afs"] else "no AFS"), r.get("loss"),
             None if r.get("nfe") is None else f"NFE {r['nfe']}"]
    return " · ".join(str(p) for p in parts if p) or str(r.get("row_id"))


def _better(data: StudyData, a: dict, b: dict) -> bool:
    return a["value"] < b["value"] if lower_is_better(data.metric) else a["value"] > b["value"]


def _comparison_reading(data: StudyData, ok: list[dict], noise: float | None) -> list[str]:
    out = _nfe_effect(data, ok, noise) + _same_nfe_comparisons(data, ok, noise)
    best = min(ok, key=lambda r: r["value"] if lower_is_better(data.metric) else -r["value"])
    hours = (f" after {fmt_hours(best['device_hours'])} training device-hours{seed_mean_label(data)}"
             if is_num(best["device_hours"]) else "")
    out.append(f"Best measured row: `{best['row_id']}` ({_row_name(best, data.kind)}) with {data.metric} = "
               f"{fmt_value(best['value'])}{hours}.{_ties_with_best(best, ok, noise)}")
    return out


def _nfe_effect(data: StudyData, ok: list[dict], noise: float | None) -> list[str]:
    """The method whose value changes most between its smallest and largest NFE."""
    m = data.metric
    by_method: dict[str, list[dict]] = {}
    for r in ok:
        if r["nfe"] is not None:
            by_method.setdefault(str(r["method"]), []).append(r)
    effects = []
    for meth, rs in by_method.items():
        if len(rs) >= 2:
            rs = sorted(rs, key=lambda r: r["nfe"])
            effects.append((rs[-1]["value"] - rs[0]["value"], meth, rs[0], rs[-1]))
    if not effects:
        return []
    d, meth, a, b = max(effects, key=lambda e: abs(e[0]))
    if d == 0:
        return [f"**NFE did not move {m} for any method measured at several NFE** (e.g. {meth}: "
                f"{fmt_value(a['value'])} at NFE {a['nfe']} and at NFE {b['nfe']})."]
    return [f"**NFE matters most for {meth}**: NFE {a['nfe']} → {b['nfe']} moves {m} from {fmt_value(a['value'])} "
            f"to {fmt_value(b['value'])} (Δ {fmt_delta(d)})." + _noise_caveat(d, noise)]


def _same_nfe_comparisons(data: StudyData, ok: list[dict], noise: float | None = None) -> list[str]:
    """Comparison reading: SFD-v (one model) against the separately distilled SFD students at each NFE, and
    the second stage against the solver rows at its NFE, on every metric the rows logged; a win within the
    seed noise (`noise`, from replicate seeds) is said to be one."""
    metrics = [data.metric] + extra_metrics(data)

    def vals(r):
        ex = r.get("extra") or {}
        return ", ".join(f"{mm} {fmt_value(r['value'] if mm == data.metric else ex.get(mm))}" for mm in metrics)

    def group(g):
        return [r for r in ok if r.get("group") == g and r.get("nfe") is not None]

    out = []
    sfd = {r["nfe"]: r for r in group("sfd")}
    pairs = [(v, sfd[v["nfe"]]) for v in sorted(group("sfd-v"), key=lambda r: r["nfe"]) if v["nfe"] in sfd]
    if pairs:
        wins = [(v, s) for v, s in pairs if _better(data, v, s)]
        clear = [(v, s) for v, s in wins if not _within_noise(v["value"] - s["value"], noise)]
        out.append("**SFD-v (one model) vs separately distilled SFD at the same NFE:** " + "; ".join(
            f"NFE {v['nfe']}: SFD-v {vals(v)} vs SFD {vals(s)}" for v, s in pairs)
                   + f". SFD-v is better by {data.metric} at {len(wins)} of {len(pairs)} NFE"
                   + (f", by more than the seed noise (about {fmt_value(noise)}) at {len(clear)} of them."
                      if len(clear) < len(wins) else "."))
    for st in group("second-stage"):
        rivals = [r for r in group("solver") if r["nfe"] == st["nfe"]]
        if rivals:
            close = [r for r in rivals if _within_noise(st["value"] - r["value"], noise)]
            out.append(f"**Second stage at {st['nfe']} NFE** (`{st['row_id']}`: {vals(st)}) vs the solver rows at "
                       f"the same NFE: " + "; ".join(f"`{r['row_id']}` {vals(r)}" for r in rivals) + " — "
                       + ("better than all of them." if all(_better(data, st, r) for r in rivals) else
                          "not better than all of them.") + f" (by {data.metric})"
                       + (f" Within the seed noise (about {fmt_value(noise)}) of "
                          + ", ".join(f"`{r['row_id']}`" for r in close) + "." if close else ""))
    return out


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


# ----- ordering against the paper -------------------------------------------------------------------------------

def rank_agreement(data: StudyData) -> dict | None:
    """Spearman and Kendall correlation between our values and the paper's over rows that have both."""
    both = [r for r in data.rows.to_dict("records") if r["status"] == "ok" and is_num(r.get("paper_value"))]
    if len(both) < 3:
        return {"n": len(both), "spearman": None, "kendall": None}
    ours = [r["value"] for r in both]
    if not lower_is_better(data.metric):  # paper FID: lower is better; align directions
        ours = [-v for v in ours]
    theirs = [r["paper_value"] for r in both]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp = stats.spearmanr(ours, theirs)
        kt = stats.kendalltau(ours, theirs)
    return {"n": len(both), "spearman": float(sp.statistic), "spearman_p": float(sp.pvalue),
            "kendall": float(kt.statistic), "kendall_p": float(kt.pvalue),
            "best_ours": min(both, key=lambda r: r["value"] if lower_is_better(data.metric) else -r["value"]),
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


def _ordering_reading(data: StudyData, ok: list[dict], noise: float | None) -> list[str]:
    ra = rank_agreement(data)
    if ra["spearman"] is None:
        return [f"Only {ra['n']} row(s) have both our value and a paper value; at least 3 are needed to compare "
                f"orderings."]
    m = data.metric
    tie = (" (not distinguishable from other rows within the seed noise)"
           if _rows_within_noise(ra["best_ours"], ok, noise) else "")
    scale = ("" if data.comparable else f" (Ranks compare {m} with the paper's FID; rank correlation is scale-free, "
             f"but the two metrics measure different things.)")
    return [f"**Ordering vs the paper** over the {ra['n']} rows measured by both: Spearman ρ = {ra['spearman']:.2f} "
            f"(p {fmt_p(ra['spearman_p'])}), Kendall τ = {ra['kendall']:.2f} (p {fmt_p(ra['kendall_p'])}) — our "
            f"ordering {_agreement_words(ra['spearman'])}. Our best row is `{ra['best_ours']['row_id']}`{tie}, the "
            f"paper's best among these is `{ra['best_paper']['row_id']}`.{scale}"]


# ----- a search: importances and the best trial ------------------------------------------------------------------

def _search_reading(data: StudyData) -> list[str]:
    out = _importance_reading(data)
    best = search_best_table(data, top=1)
    if best.empty:
        return out
    b = best.iloc[0].to_dict()
    params = ", ".join(f"{k}={v}" for k, v in b.items()
                       if k not in ("rank", "trial", "run id", "NFE", "device-h") and not k.startswith(("objective",
                                                                                                          "ours")))
    lead = ("**Best trial on the Pareto front by the first objective:**" if len(objective_names(data)) > 1
            else "**Best trial:**")
    out.append(f"{lead} #{b['trial']} with {data.metric} = {b[f'ours ({data.metric})']} ({params}).")
    best_row = next((r for r in data.rows.to_dict("records") if str(r["trial_number"]) == b["trial"]), None)
    return out + (_paper_choices(best_row) if best_row is not None else [])


def _importance_reading(data: StudyData) -> list[str]:
    imp, why = param_importances(data)
    if imp.empty:
        return [f"Parameter importances: {why}."]
    n_done = int((data.trials["state"] == "COMPLETE").sum()) if len(data.trials) else 0
    caveat = "; with so few trials this is indicative only" if n_done < 10 else ""
    out = []
    for objective, rows in imp.groupby("objective", sort=False):  # one answer per objective: quality and cost
        first = rows.sort_values("importance", ascending=False).iloc[0]  # differ in what drives them
        out.append(f"**Most important parameter for {objective}:** `{first['parameter']}` (fANOVA importance "
                   f"{first['importance']:.2f}, from {n_done} completed trials{caveat}).")
    return out


def _paper_choices(best_row: dict) -> list[str]:
    """A paper-shaped check: does the best trial make the paper's choices?"""
    cfg = {**best_row["params"], **{k: str(v) for k, v in best_row["trial_params"].items()}}
    checks = []
    for key, want, show in PAPER_CHOICES:
        if key in cfg:
            got = str(cfg[key]).lower()
            same = (abs(float(got) - float(want)) < 1e-9) if key == "student.t_min" else got == want
            val = fmt_value(to_float(cfg[key])) if key == "student.t_min" else cfg[key]
            checks.append(f"{show}: {'yes' if same else f'no ({val})'}")
    return ["Does the best trial make the paper's choices? " + "; ".join(checks) + "."] if checks else []
