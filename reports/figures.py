"""The report's figures (matplotlib `Figure` objects, no pyplot): metric vs NFE, metric vs device-hours, loss
curves, ours-vs-paper bars, importances, optimization history, sample grids; PNG/SVG export. A figure with
nothing to show (one NFE on an NFE axis, no measured row) is left out.

Part of the report builder (``reports/build.py``); imports ``reports.formatting``, ``reports.paper``,
``reports.loading`` and ``reports.tables``."""
from __future__ import annotations

import io
import math
import shutil
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import pandas as pd
from matplotlib.figure import Figure  # Figure objects without pyplot: no GUI backend, savefig renders with Agg
from matplotlib.transforms import Bbox

from reports.formatting import canon, fmt_tmin, fmt_value, is_num, lower_is_better, slug, to_float
from reports.loading import StudyData
from reports.paper import paper_comparison_frame
from reports.tables import objective_names, param_importances
from sfd.metrics.names import COST_LABEL

def _series_name(data: StudyData, r: dict) -> str:
    """Comparison rows: one line per method. Ablation/search rows: one series per configuration without NFE."""
    if data.kind == "comparison":
        return str(r["method"])
    parts = [r.get("method"), r.get("teacher"), None if r.get("t_min") is None else f"t_min {fmt_tmin(r['t_min'])}",
             None if r.get("afs") is None else ("AFS" if r["afs"] else "no AFS"), r.get("loss"),
             None if r.get("guidance") in (None, 1.0) else f"ω {fmt_value(r['guidance'])}"]
    return " · ".join(str(p) for p in parts if p)


def _paper_is_drawn(data: StudyData) -> bool:
    """The paper's numbers are FID: a figure draws them only beside our FID, never on another metric's scale
    (fd_digits, class_accuracy, teacher gap); the table still lists them for orientation."""
    return data.metric == "fid"


def _paper_points(data: StudyData, rows: list[dict]) -> pd.DataFrame:
    """The paper's Table 2/3 points that these measured rows stand for (by their paper_key, so an SFD-v NFE we
    did not evaluate, or a method we did not run, is not drawn); none when our metric is not FID."""
    paper = paper_comparison_frame(data.paper, data.paper_dataset)
    if not _paper_is_drawn(data) or paper.empty:
        return paper.iloc[0:0]
    return paper[paper["key"].isin({r["paper_key"] for r in rows if r.get("paper_key")})]


def fig_metric_vs_nfe(data: StudyData):
    """Ours (solid) vs NFE per method; the paper's FID (dashed) at the rows' own paper points, when ours is FID."""
    ok = [r for r in data.rows.to_dict("records") if r["status"] == "ok" and r["nfe"] is not None]
    if len({r["nfe"] for r in ok}) < 2:  # one NFE (or none): no axis to draw a change along
        return None
    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    series: dict[str, list[dict]] = {}
    for r in ok:
        series.setdefault(_series_name(data, r), []).append(r)
    colors = {}
    for i, (name, rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r["nfe"])
        (line,) = ax.plot([r["nfe"] for r in rs], [r["value"] for r in rs], "-o" if len(rs) > 1 else "o",
                          label=f"ours: {name}")
        colors[canon(rs[0]["method"])] = line.get_color()
    ax.set_xlabel("NFE")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"ours: {data.metric}")
    values = [r["value"] for r in ok]
    if min(values) > 0 and max(values) / min(values) > 30:  # e.g. a 1-step solver far above the rest
        ax.set_yscale("log")
        ax.set_ylabel(f"ours: {data.metric} (log)")
    paper = _paper_points(data, ok)
    pax = ax if data.comparable or paper.empty else ax.twinx()
    for meth, grp in paper.groupby("method", sort=False):
        grp = grp.sort_values("nfe")
        pax.plot(grp["nfe"], grp["fid"], "--", marker="x", color=colors.get(canon(meth)), alpha=0.8,
                 label=f"paper: {meth}")
    if pax is not ax:
        pax.set_ylabel(f"paper FID ({data.paper_dataset}, orientation only)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = (pax.get_legend_handles_labels() if pax is not ax else ([], []))
    ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="upper left", bbox_to_anchor=(1.12, 1.0))
    ax.set_title(f"{data.study}: {data.metric} vs NFE" + (" (ours solid, paper dashed)" if len(paper) else ""))
    fig.tight_layout()
    return fig


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def fig_metric_vs_hours(data: StudyData):
    """The 'fast' claim: metric vs training device-hours, with our Pareto front and, when ours is FID, the
    paper's points for our rows."""
    ok = [r for r in data.rows.to_dict("records") if r["status"] == "ok" and is_num(r.get("device_hours"))]
    if not ok:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    pos = [r["device_hours"] for r in ok if r["device_hours"] > 0]
    floor = (min(pos) / 3) if pos else 1e-4
    xs = [max(r["device_hours"], floor) for r in ok]
    sign = 1 if lower_is_better(data.metric) else -1
    ax.scatter(xs, [r["value"] for r in ok], label="ours", zorder=3)
    labels = [(ax, str(r["row_id"]), (x, r["value"]), {"alpha": 0.8}) for x, r in zip(xs, ok)]
    front = _pareto([(x, sign * r["value"]) for x, r in zip(xs, ok)])
    ax.plot([p[0] for p in front], [sign * p[1] for p in front], "-", drawstyle="steps-post", label="ours: Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"{COST_LABEL}\n(log; untrained rows drawn at the left edge)", fontsize=8)
    ax.set_ylabel(f"ours: {data.metric}")
    paper = _paper_points(data, ok)
    paper = paper[paper["hours"].notna()]
    if len(paper):
        pax = ax if data.comparable else ax.twinx()
        pax.scatter(paper["hours"].astype(float), paper["fid"], marker="x", color="gray", label="paper (A100-h)")
        for _, p in paper.iterrows():
            # a bound such as "<0.01" is drawn at its value: the label says it is a bound
            bound = f" ({p['hours_text']} h)" if str(p["hours_text"] or "").startswith(("<", ">")) else ""
            labels.append((pax, f"{p['method']} {p['nfe']}{bound}", (float(p["hours"]), p["fid"]), {"color": "gray"}))
        if pax is not ax:
            pax.set_ylabel(f"paper FID ({data.paper_dataset}, orientation only)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = (pax.get_legend_handles_labels() if pax is not ax else ([], []))
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    else:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    ax.set_title(f"{data.study}: {data.metric} vs training cost")
    fig.tight_layout()
    _label_points(fig, labels)
    return fig


# A point label starts this far (points) up and right of its point, clear of the point's marker (radius).
LABEL_OFFSET = (4, 4)
MARKER_RADIUS = 3.5


def _label_points(fig, labels: list[tuple]) -> None:
    """Write each (axes, text, point, style) label beside its point so that no two labels overlap, nor a label
    and a point: a label that would moves down or up by whole label heights, or to the point's left, inside its
    axes where there is room, with a thin line back to its point when it moved. Call after the layout."""
    fig.draw_without_rendering()
    to_points = 72 / fig.dpi
    marker = MARKER_RADIUS / to_points  # pixels
    written = [Bbox.from_extents(x - marker, y - marker, x + marker, y + marker)
               for x, y in (ax.transData.transform(xy) for ax, _, xy, _ in labels)]
    for ax, text, xy, style in sorted(labels, key=lambda label: -label[0].transData.transform(label[2])[1]):
        trial = ax.annotate(text, xy, xytext=LABEL_OFFSET, textcoords="offset points", fontsize=6, **style)
        (offset, align), box = _free_offset(trial, written, ax.get_window_extent(), to_points)
        trial.remove()
        moved = (offset, align) != (LABEL_OFFSET, "left")
        ax.annotate(text, xy, xytext=offset, textcoords="offset points", fontsize=6, ha=align,
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "alpha": 0.5, "color": style.get("color", "k")}
                    if moved else None, **style)
        written.append(box)


def _free_offset(ann, written: list, inside, to_points: float) -> tuple[tuple, object]:
    """((offset in points, alignment), the label's box there): the first place, nearest first, where the label
    overlaps no written label; one where it also lies inside `inside` (the axes) wins when there is one."""
    height = ann.get_window_extent().height + 1  # pixels: a one-pixel gap between stacked labels
    fallback = None
    for step in range(4 * len(written) + 1):
        dx, dy = LABEL_OFFSET
        dy += height * to_points * ((step + 1) // 2) * (-1 if step % 2 else 1)  # 0, down, up, 2 down, ...
        for place in (((dx, dy), "left"), ((-dx, dy), "right")):
            ann.xyann = place[0]
            ann.set_horizontalalignment(place[1])
            box = ann.get_window_extent()  # no arrow on this one: the text's box
            if any(box.overlaps(w) for w in written):
                continue
            if inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1):
                return place, box
            fallback = fallback or (place, box)
    return fallback or (place, box)


def _shown_run_label(data: StudyData, r: dict) -> str:
    """A per-row panel shows the row's one chosen run; with seeds that is one seed's run, so say which."""
    return f"{r['row_id']} (seed {r['params'].get('seed', '?')})" if data.spec.get("seeds") else str(r["row_id"])


def _shown_run_value(data: StudyData, r: dict) -> float | None:
    """The metric of the run a panel shows (a replicated row's own value is the mean over seeds)."""
    run = data.runs[data.runs["run_id"] == r["run_id"]]
    return to_float(run.iloc[0]["metrics"].get(data.metric)) if len(run) else None


def _per_row_figure(data: StudyData, available: dict, width: float, height: float, draw, title: str):
    """A figure with one panel per row whose run has an entry in `available` (loss histories, sample grids),
    four panels to a line, each drawn by `draw(axes, row)`; None when no row has one."""
    rows = [r for r in data.rows.to_dict("records") if r.get("run_id") in available and not r.get("derived_from")]
    if not rows:
        return None
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(width * cols, height * nrows))
    for i, r in enumerate(rows):
        draw(fig.add_subplot(nrows, cols, i + 1), r)
    seeds = " (one seed's run per row; the table gives the mean over seeds)" if data.spec.get("seeds") else ""
    fig.suptitle(f"{data.study}: {title}{seeds}", fontsize=9)
    fig.tight_layout()
    return fig


def fig_loss_curves(data: StudyData):
    """Per-student-step training loss (metric histories loss/step_<k>) for every row that trained."""
    def draw(ax, r):
        h = data.histories[r["run_id"]]
        for k, g in h.groupby("key", sort=False):
            g = g.sort_values("step")
            step = g["student_step"].iloc[0]
            ax.plot(g["step"], g["value"], lw=0.9, label=f"step {step}" if step != "mean" else "loss (mean)")
        if (h["value"] > 0).all():
            ax.set_yscale("log")
        ax.set_title(_shown_run_label(data, r), fontsize=7)
        ax.tick_params(which="both", labelsize=6)
        ax.set_xlabel("iteration", fontsize=6)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=5)

    return _per_row_figure(data, data.histories, 3.2, 2.6, draw, "training loss per student step")


def fig_ablation_bars(data: StudyData):
    """Ablation rows: ours, beside the paper's FID when ours is FID too (two axes unless Δ is meaningful)."""
    rows = data.rows.to_dict("records")
    if not any(r["status"] == "ok" for r in rows):  # no measured row: nothing to draw
        return None
    fig = Figure(figsize=(max(6, 0.7 * len(rows) + 2), 4.5))
    ax = fig.add_subplot()
    x = list(range(len(rows)))
    has_paper = any(is_num(r.get("paper_value")) for r in rows)
    draw_paper = has_paper and _paper_is_drawn(data)
    shift = 0.2 if draw_paper else 0.0  # ours left of the paper's bar, or centred alone
    ours = [r["value"] if r["status"] == "ok" else 0 for r in rows]
    ax.bar([i - shift for i in x], ours, width=0.4, label=f"ours ({data.metric})")
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            ax.text(i - shift, 0, r["status"], rotation=90, fontsize=6, va="bottom", ha="center", color="red")
    pax = ax
    if draw_paper:  # no paper bars (nor axis) for rows without one
        pax = ax if data.comparable else ax.twinx()
        pv = [r["paper_value"] if is_num(r.get("paper_value")) else 0 for r in rows]
        pax.bar([i + 0.2 for i in x], pv, width=0.4, color="gray", alpha=0.6, label="paper (FID)")
        if pax is not ax:
            pax.set_ylabel("paper FID (orientation only)")
    ax.set_ylabel(f"ours: {data.metric}")
    ax.set_xticks(x)
    ax.set_xticklabels([str(r["row_id"]) for r in rows], rotation=45, ha="right", fontsize=6)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = (pax.get_legend_handles_labels() if pax is not ax else ([], []))
    ax.legend(h1 + h2, l1 + l2, fontsize=7)
    ax.set_title(f"{data.study}: " + ("ours vs paper per ablation row" if draw_paper else
                 f"ours per row (the paper's FID is in the table, not drawn: {data.metric} is not FID)"
                 if has_paper else "ours per row (no paper counterpart)"), fontsize=9)
    fig.tight_layout()
    return fig


def fig_param_importances(data: StudyData):
    imp, _ = param_importances(data) if data.kind == "search" else (pd.DataFrame(), None)
    if imp.empty:
        return None
    objs = list(dict.fromkeys(imp["objective"]))
    fig = Figure(figsize=(6, 1 + 0.4 * imp["parameter"].nunique() * len(objs)))
    ax = fig.add_subplot()
    params = list(dict.fromkeys(imp["parameter"]))
    height = 0.8 / len(objs)
    for j, o in enumerate(objs):
        g = imp[imp["objective"] == o].set_index("parameter")
        ax.barh([i + j * height for i in range(len(params))], [g["importance"].get(p, 0.0) for p in params],
                height=height, label=str(o))
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(params))])
    ax.set_yticklabels(params, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("fANOVA importance (seed 0)")
    ax.legend(fontsize=7)
    ax.set_title(f"{data.study}: parameter importances")
    fig.tight_layout()
    return fig


def fig_optimization_history(data: StudyData):
    if data.kind != "search" or data.trials.empty:
        return None
    done = data.trials[data.trials["state"] == "COMPLETE"]
    done = done[done["values"].map(lambda v: bool(v))]
    if done.empty:
        return None
    names = objective_names(data)
    nobj = len(done.iloc[0]["values"])
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if nobj == 1:
        vals = [v[0] for v in done["values"]]
        maximize = bool(data.directions) and data.directions[0] == "maximize"
        best, cur = [], None
        for v in vals:
            cur = v if cur is None else (max(cur, v) if maximize else min(cur, v))
            best.append(cur)
        ax.scatter(done["number"], vals, s=14, label="trial")
        ax.plot(done["number"], best, "r-", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(names[0] if names else "objective")
        ax.set_title(f"{data.study}: optimisation history")
    else:
        a = [v[0] for v in done["values"]]
        b = [v[1] for v in done["values"]]
        ax.scatter(a, b, c=done["number"], cmap="viridis", s=16)
        ax.set_xlabel(names[0] if names else "objective 0")
        ax.set_ylabel(names[1] if len(names) > 1 else "objective 1")
        ax.set_title(f"{data.study}: trials in objective space (colour = trial number)")
    ax.legend(fontsize=7) if nobj == 1 else None
    fig.tight_layout()
    return fig


def fig_sample_grids(data: StudyData):
    """Each row's samples.png artifact, one panel per row."""
    def draw(ax, r):
        img = mpimg.imread(str(data.samples[r["run_id"]]))
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{_shown_run_label(data, r)}\n{data.metric} = {fmt_value(_shown_run_value(data, r))}", fontsize=7)

    return _per_row_figure(data, data.samples, 3, 3.5, draw, "samples per row")  # 3.5: room for 2-line captions


FIGURES = {
    "metric_vs_nfe": fig_metric_vs_nfe,
    "metric_vs_hours": fig_metric_vs_hours,
    "ablation_bars": fig_ablation_bars,
    "loss_curves": fig_loss_curves,
    "param_importances": fig_param_importances,
    "optimization_history": fig_optimization_history,
    "sample_grids": fig_sample_grids,
}
FIGURE_TITLES = {
    "metric_vs_nfe": "Metric vs NFE",  # the figure's own title says when the paper's FID is drawn
    "metric_vs_hours": "Metric vs training device-hours (Pareto view)",
    "ablation_bars": "Ours per ablation row",
    "loss_curves": "Training loss per student step",
    "param_importances": "Optuna parameter importances",
    "optimization_history": "Optuna optimisation history",
    "sample_grids": "Sample grids per row",
}


def make_figures(data: StudyData) -> dict[str, Any]:
    """All figures that apply to this study, by name (None-returning ones are left out)."""
    out = {}
    for name, fn in FIGURES.items():
        if name == "ablation_bars" and data.kind != "ablation":
            continue
        try:
            fig = fn(data)
        except Exception as exc:  # a figure must never sink the report; say what went wrong
            data.notes.append(f"figure {name} failed: {exc}")
            fig = None
        if fig is not None:
            out[name] = fig
    return out


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def save_figures(data: StudyData, fig_dir: str | Path) -> dict[str, Path]:
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    saved = {}
    for name, fig in make_figures(data).items():
        fig.savefig(fig_dir / f"{name}.png", dpi=110)
        fig.savefig(fig_dir / f"{name}.svg")
        saved[name] = fig_dir / f"{name}.png"
    # the raw sample grids, one file per row, next to the composed figure
    rows = {r["run_id"]: r for r in data.rows.to_dict("records") if r.get("run_id")}
    for run_id, path in data.samples.items():
        dst = fig_dir / "samples" / f"{slug(rows[run_id]['row_id'])}.png"
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, dst)
    return saved
