"""The report's figures against tiny studies laid out as tests/test_reports.py does (no study runner): a panel
shows the value of the run it shows, the paper's FID is drawn only beside our FID, at our rows' points, a
figure with nothing to show is left out, and the Pareto figure's labels never overlap."""
from __future__ import annotations

import pytest
from matplotlib.text import Text

from test_reports import Layout, _final, _params, store  # noqa: F401  (store: the module's MLflow/Optuna fixture)

from reports import build as rb  # noqa: E402  (test_reports puts the repo root on sys.path)
from reports import figures as rf  # noqa: E402


def _load(L: Layout, spec: dict, tmp_path):
    return rb.load_study_data(L.study, storage=L.storage, tracking_uri=L.tracking_uri, spec=spec,
                              artifact_dir=tmp_path)


def _lines(fig) -> dict[str, list]:
    """Every labelled line of a figure (twin axes included): label -> its x data."""
    return {ln.get_label(): list(ln.get_xdata()) for ax in fig.axes for ln in ax.get_lines()
            if not ln.get_label().startswith("_")}


def _texts(fig) -> list[str]:
    """Every label a figure shows: titles, axis labels, legend entries, annotations."""
    out = [fig._suptitle.get_text()] if fig._suptitle else []
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_ylabel()] + [t.get_text() for t in ax.texts]
        out += ax.get_legend_handles_labels()[1]
    return out


# ---------------------------------------------------------------------------------------------------------
# Defect 1: with seeds, a panel shows one seed's run: its caption gives that run's value and seed, not the mean
# ---------------------------------------------------------------------------------------------------------

SEEDS_SPEC = {"name": "seeds_fig", "kind": "comparison", "seeds": [0, 1],
              "objective": {"metric": "fd_digits", "direction": "minimize"},
              "rows": [{"id": "sfd-nfe2", "group": "sfd", "method": "SFD", "nfe": 2, "paper_key": "cifar10/sfd/2"}]}


def test_seed_panels_caption_the_shown_runs_own_value_and_seed(store, tmp_path):
    L = Layout(store, "seeds_fig", "comparison", SEEDS_SPEC)
    for seed, value in ((0, 65.37), (1, 42.35)):
        L.run(row="sfd-nfe2", params={**_params("dpmpp3m", 0.006, True, "l1"), "seed": seed}, metrics=_final(value))
    data = _load(L, SEEDS_SPEC, tmp_path)
    (row,) = data.rows.to_dict("records")
    assert row["value"] == pytest.approx(53.86)  # the table's cell: the mean over seeds
    shown = L.client.get_run(row["run_id"]).data
    seed, own = shown.params["seed"], shown.metrics["fd_digits"]
    assert own != pytest.approx(53.86)

    grids = rf.fig_sample_grids(data)
    assert [ax.get_title() for ax in grids.axes] == [f"sfd-nfe2 (seed {seed})\nfd_digits = {rb.fmt_value(own)}"]
    assert "one seed's run per row" in grids._suptitle.get_text()
    assert [ax.get_title() for ax in rf.fig_loss_curves(data).axes] == [f"sfd-nfe2 (seed {seed})"]


def test_single_seed_panels_are_captioned_as_before(store, tmp_path):
    spec = {**SEEDS_SPEC, "name": "one_seed_fig"}
    spec.pop("seeds")
    L = Layout(store, "one_seed_fig", "comparison", spec)
    L.run(row="sfd-nfe2", params=_params("dpmpp3m", 0.006, True, "l1"), metrics=_final(65.37))
    data = _load(L, spec, tmp_path)
    assert [ax.get_title() for ax in rf.fig_sample_grids(data).axes] == ["sfd-nfe2\nfd_digits = 65.37"]
    assert [ax.get_title() for ax in rf.fig_loss_curves(data).axes] == ["sfd-nfe2"]


# ---------------------------------------------------------------------------------------------------------
# Defects 2 and 3: the paper's FID only beside our FID, only at the points our rows stand for
# ---------------------------------------------------------------------------------------------------------

def _comparison(store, name: str, metric: str, teacher: str) -> tuple[Layout, dict]:
    """Solver DPM++(3M)@5, SFD@2 (paper_key), SFD@3 (matched by label) and one SFD-v model evaluated at NFE 2
    and 5 only (as a smoke comparison does), each logging `metric`."""
    spec = {"name": name, "kind": "comparison", "objective": {"metric": metric, "direction": "minimize"},
            "rows": [{"id": "dpmpp3m-5", "group": "solver", "method": "DPM++(3M)", "nfe": 5,
                      "paper_key": "cifar10/dpmpp3m/5"},
                     {"id": "sfd-2", "group": "sfd", "method": "SFD", "nfe": 2, "paper_key": "cifar10/sfd/2"},
                     {"id": "sfd-3", "group": "sfd", "method": "SFD", "nfe": 3},
                     {"id": "sfd-v", "group": "sfd-v", "method": "SFD-v", "nfe": 2, "paper_key": "cifar10/sfd-v/2"}]}
    L = Layout(store, name, "comparison", spec)
    for rid, nfe, algo, value in (("dpmpp3m-5", 5, "baseline", 30.5), ("sfd-2", 2, "sfd", 5.1),
                                  ("sfd-3", 3, "sfd", 4.0), ("sfd-v", 2, "sfd-v", 4.4)):
        metrics = {**_final(value, metric=metric, hours=0.0 if algo == "baseline" else 0.5), "nfe": nfe}
        if algo == "sfd-v":
            metrics[f"{metric}/nfe_5"] = 3.3
        L.run(row=rid, params=_params("dpmpp3m", 0.006, True, "l1", nfe=nfe, algorithm=algo, teacher=teacher),
              metrics=metrics, samples=False)
    return L, spec


def test_fid_study_overlays_the_paper_only_at_its_rows_points(store, tmp_path):
    L, spec = _comparison(store, "cmp_fid_fig", "fid", "cifar10-uncond")
    data = _load(L, spec, tmp_path)
    nfe = rf.fig_metric_vs_nfe(data)
    assert "(ours solid, paper dashed)" in nfe.axes[0].get_title()
    paper = {k: v for k, v in _lines(nfe).items() if k.startswith("paper")}
    # SFD-v: the paper's NFE 3 and 4 are not drawn (not evaluated here); no paper DDIM/PD/... lines
    assert paper == {"paper: DPM++(3M)": [5], "paper: SFD": [2, 3], "paper: SFD-v": [2, 5]}
    assert _lines(nfe)["ours: SFD-v"] == [2, 5]
    hours = rf.fig_metric_vs_hours(data)
    annotated = {t.get_text() for ax in hours.axes for t in ax.texts if t.get_color() == "gray"}
    assert annotated == {"SFD 2", "SFD 3", "SFD-v 2", "SFD-v 5"}  # the paper's points that have hours


@pytest.mark.parametrize("metric", ["fd_digits", "class_accuracy"])
def test_other_metrics_get_no_paper_overlay(store, tmp_path, metric):
    L, spec = _comparison(store, f"cmp_{metric}_fig", metric, "digits")
    data = _load(L, spec, tmp_path)
    for fig in (rf.fig_metric_vs_nfe(data), rf.fig_metric_vs_hours(data)):
        assert len(fig.axes) == 1  # no twin axis for the paper
        assert not [t for t in _texts(fig) if "paper" in t.lower()], _texts(fig)
    assert _lines(rf.fig_metric_vs_nfe(data))["ours: SFD-v"] == [2, 5]
    assert "paper" not in rf.FIGURE_TITLES["metric_vs_nfe"]  # the report's caption, whatever is drawn


def test_rows_without_a_paper_counterpart_get_no_paper_overlay(store, tmp_path):
    """guidance_digits: every row has `paper_key: null` (the paper has no guidance sweep)."""
    spec = {"name": "guidance_fig", "kind": "ablation",
            "objective": {"metric": "class_accuracy", "direction": "maximize"},
            "rows": [{"id": f"guidance-{w}", "method": "SFD", "guidance": float(w), "paper_key": None,
                      "params": {"student.guidance": float(w)}} for w in (1, 2)]}
    L = Layout(store, "guidance_fig", "ablation", spec, directions=("maximize",))
    for w, acc in ((1, 0.91), (2, 0.97)):  # a guided student is sampled at twice its NFE (the runner logs 4)
        L.run(row=f"guidance-{w}", params=_params("dpmpp3m", 0.006, True, "l1"),
              metrics={**_final(acc, metric="class_accuracy"), "nfe": 2 if w == 1 else 4})
    data = _load(L, spec, tmp_path)
    for name in ("metric_vs_nfe", "metric_vs_hours", "ablation_bars"):
        fig = rf.FIGURES[name](data)
        assert len(fig.axes) == 1 and not [t for t in _texts(fig) if "paper" in t.lower() and "no paper" not in t]


@pytest.mark.parametrize("metric,teacher,drawn", [("fid", "cifar10-uncond", True), ("fd_digits", "digits", False)])
def test_ablation_bars_draw_the_papers_fid_only_beside_ours(store, tmp_path, metric, teacher, drawn):
    name = f"abl_{metric}_fig"
    spec = {"name": name, "kind": "ablation", "objective": {"metric": metric, "direction": "minimize"},
            "rows": [{"id": "sfd-dpmpp3m-0.006-afs-l1", "method": "SFD", "teacher": "DPM++(3M)", "t_min": 0.006,
                      "afs": True, "loss": "L1", "nfe": 2, "paper_key": "cifar10/ablation/sfd-dpmpp3m-0.006-afs-l1"}]}
    L = Layout(store, name, "ablation", spec)
    L.run(row="sfd-dpmpp3m-0.006-afs-l1", params=_params("dpmpp3m", 0.006, True, "l1", teacher=teacher),
          metrics=_final(6.0, metric=metric))
    fig = rf.fig_ablation_bars(_load(L, spec, tmp_path))
    assert ("paper (FID)" in _texts(fig)) == drawn
    assert ("ours vs paper" in fig.axes[0].get_title()) == drawn


# ---------------------------------------------------------------------------------------------------------
# Figures with nothing to show are left out; the Pareto figure's labels never overlap
# ---------------------------------------------------------------------------------------------------------

def test_one_nfe_gets_no_nfe_figure_and_pareto_labels_stay_apart(store, tmp_path):
    """An ablation at one NFE whose SFD rows trained equally long: points at the same cost, two of them at the
    same value too (the labels would all be written on top of each other)."""
    values = [10.0, 10.0, 10.02, 10.05, 10.1, 10.3, 11.0, 12.5]
    spec = {"name": "crowded_fig", "kind": "ablation", "objective": {"metric": "fd_digits", "direction": "minimize"},
            "rows": [{"id": f"sfd-dpmpp3m-0.006-afs-row-with-a-long-id-{i}", "method": "SFD", "t_min": 0.006,
                      "afs": True, "loss": "L1", "nfe": 2, "paper_key": None} for i in range(len(values))]}
    L = Layout(store, "crowded_fig", "ablation", spec)
    for row, value in zip(spec["rows"], values):
        L.run(row=row["id"], params=_params("dpmpp3m", 0.006, True, "l1"), metrics=_final(value, hours=0.002),
              history_steps=(), samples=False)
    data = _load(L, spec, tmp_path)
    assert rf.fig_metric_vs_nfe(data) is None and "metric_vs_nfe" not in rf.make_figures(data)

    fig = rf.fig_metric_vs_hours(data)
    fig.draw_without_rendering()
    labels = [t for ax in fig.axes for t in ax.texts]
    assert sorted(t.get_text() for t in labels) == sorted(r["id"] for r in spec["rows"])
    boxes = [Text.get_window_extent(t) for t in labels]  # the text alone, not its line back to the point
    overlapping = [(a.get_text(), b.get_text()) for i, (a, box) in enumerate(zip(labels, boxes))
                   for b, other in zip(labels[i + 1:], boxes[i + 1:]) if box.overlaps(other)]
    assert not overlapping
    ax = fig.axes[0]
    points = [ax.transData.transform(p) for p in ax.collections[0].get_offsets()]
    assert not [t.get_text() for t, box in zip(labels, boxes) if any(box.contains(x, y) for x, y in points)]
    assert all(fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1) for box in boxes)
