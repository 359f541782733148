"""Studies: Optuna trials as linked MLflow child runs, resumable, failures recorded, nothing created on bad input.

Everything runs on the analytic GMM teacher at a few iterations, except the last test, which runs the shipped
`python studies/run.py ablation_cifar --smoke` end to end (random 56M-parameter SongUNet, 11 rows).
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState
from study_runner import load_study_script, stop_after_ask, stop_next_training

from sfd import study as studies
from sfd.study.configs import row_config
from sfd.study.lock import study_home, study_lock

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "studies" / "run.py"
GMM = ROOT / "experiments" / "gmm_sfd.yaml"


script = load_study_script()
TINY = {"teacher.name": "gmm-img-4", "optim.batch_size": 16, "optim.total_kimg": 0.048, "eval.num_samples": 16,
        "eval.gap_nfe": 10}
ROWS = [
    {"id": "sfd-l1", "method": "SFD", "loss": "L1", "params": {"loss.name": "l1"}},
    {"id": "sfd-l2-noafs", "method": "SFD", "loss": "L2", "afs": False,
     "params": {"loss.name": "l2", "student.afs": False}},
    {"id": "diverges", "method": "SFD", "params": {"optim.lr": 1.0e12, "loss.name": "l2", "optim.nan_check_every": 1}},
]


def _write_study(tmp_path, name="mini", **fields) -> Path:
    spec = {"name": name, "kind": "ablation", "description": "A tiny GMM study for tests.", "base": str(GMM),
            "overrides": TINY, "objective": {"metric": "teacher_gap_mean", "direction": "minimize"},
            "sampler": {"type": "rows", "seed": 0}, "rows": ROWS}
    spec.update(fields)
    spec = {k: v for k, v in spec.items() if v is not None}
    stem = name if isinstance(name, str) and name.isidentifier() and len(name) < 100 else "study"  # a bad name too
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _uris(runs: Path) -> tuple[str, str]:
    return f"sqlite:///{runs / 'mlflow.db'}", f"sqlite:///{runs / 'optuna.db'}"


def _children(client, exp_id, parent_id):
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_table_study_links_runs_and_trials_both_ways_and_resumes(tmp_path, stores):
    skipped = {"id": "skipped", "params": {"loss.name": "lpips"}}
    path = _write_study(tmp_path, rows=ROWS + [skipped], skip_rows={"skipped": "not on a CPU"})
    out = studies.run_study(str(path), quiet=True)
    tracking, storage = _uris(stores)
    assert (out.tracking_uri, out.storage) == (tracking, storage)
    assert [n for n, _ in out.failed] == [2]

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("mini")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`sfd.role` = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == out.parent_run_id and parent.info.run_name == "mini"
    assert parent.data.tags["sfd.study"] == "mini" and parent.data.tags["sfd.kind"] == "ablation"
    assert parent.data.tags["optuna.study_name"] == "mini" and parent.data.tags["optuna.storage"] == storage
    assert parent.data.tags["sfd.smoke"] == "false" and parent.data.tags["sfd.skipped_rows"] == "skipped: not on a CPU"
    assert parent.data.metrics["invocation/trials_run"] == 3  # the printed summary's figures are tracked
    assert parent.data.metrics["invocation/wall_s"] == pytest.approx(out.seconds)

    study = optuna.load_study(study_name="mini", storage=storage)
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    trials = study.get_trials()
    assert [t.user_attrs["row"] for t in trials] == ["sfd-l1", "sfd-l2-noafs", "diverges"]  # the YAML's order
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert trials[2].user_attrs["fail_reason"].startswith("DivergedError")

    children = {r.info.run_id: r for r in _children(client, exp.experiment_id, parent.info.run_id)}
    assert len(children) == 3
    for t in trials:
        run = children[t.user_attrs["mlflow_run_id"]]  # trial -> run ...
        assert run.data.tags["sfd.trial_number"] == str(t.number)  # ... and run -> trial
        assert run.data.tags["sfd.row"] == t.user_attrs["row"] and run.data.tags["sfd.role"] == "trial"
        assert run.data.tags["sfd.study"] == "mini" and run.data.tags["sfd.smoke"] == "false"
        assert run.data.params["eval.num_samples"] == "16"
    ok = children[trials[0].user_attrs["mlflow_run_id"]]
    assert ok.info.status == "FINISHED" and ok.data.metrics["objective"] == trials[0].value
    assert ok.data.params["loss.name"] == "l1" and ok.data.params["student.afs"] == "True"
    assert children[trials[1].user_attrs["mlflow_run_id"]].data.params["student.afs"] == "False"
    assert {"config.yaml", "samples.png", "loss_curve.png", "student"} <= {
        a.path for a in client.list_artifacts(ok.info.run_id)}
    bad = children[trials[2].user_attrs["mlflow_run_id"]]
    assert bad.info.status == "FAILED" and bad.data.tags["sfd.error"].startswith("DivergedError")

    again = studies.run_study(str(path), quiet=True)  # resume: nothing left to do
    assert again.ran == 0 and again.parent_run_id == out.parent_run_id
    assert len(optuna.load_study(study_name="mini", storage=storage).trials) == 3
    assert len(_children(client, exp.experiment_id, parent.info.run_id)) == 3

    spec = yaml.safe_load(path.read_text())  # a row added to the YAML later: only it runs
    spec["rows"].append({"id": "sfd-pseudo-huber", "params": {"loss.name": "pseudo_huber"}})
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    third = studies.run_study(str(path), quiet=True)
    trials = optuna.load_study(study_name="mini", storage=storage).get_trials()
    assert third.ran == 1 and trials[-1].user_attrs["row"] == "sfd-pseudo-huber"
    assert trials[-1].state == TrialState.COMPLETE and len(trials) == 4


def test_search_study_samples_the_space_seeded(tmp_path, stores):
    space = {"solver.name": {"type": "categorical", "choices": ["euler", "dpmpp3m"]},
             "student.t_min": {"type": "float", "low": 0.002, "high": 0.02, "log": True},
             "student.afs": {"type": "categorical", "choices": [True, False]},
             "loss.name": {"type": "categorical", "choices": ["l1", "l2"]},
             "student.nfe": {"type": "int", "low": 1, "high": 3}}
    kw = dict(kind="search", rows=None, space=space, sampler={"type": "tpe", "seed": 3}, n_trials=3,
              objective={"metrics": ["teacher_gap_mean", "train/device_hours"], "directions": ["minimize"] * 2})
    path = _write_study(tmp_path, "search_a", **kw)
    out = studies.run_study(str(path), quiet=True)
    assert out.ran == 3 and not out.failed
    _, storage = _uris(stores)
    study = optuna.load_study(study_name="search_a", storage=storage)
    assert len(study.directions) == 2
    params = [t.params for t in study.trials]
    assert all(set(p) == set(space) for p in params)
    client = MlflowClient(out.tracking_uri)
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert "sfd.row" not in run.data.tags
        assert run.data.params["solver.name"] == t.params["solver.name"]
        assert float(run.data.params["student.t_min"]) == pytest.approx(t.params["student.t_min"])
        assert run.data.metrics["objective_1"] == run.data.metrics["train/device_hours"] == t.values[1]
    # Same seed, fresh storage: the same first (random start-up) trials.
    other = tmp_path / "other"
    studies.run_study(str(path), quiet=True, n_trials=2,
                      storage=f"sqlite:///{other / 'optuna.db'}", tracking_uri=f"sqlite:///{other / 'mlflow.db'}")
    replay = optuna.load_study(study_name="search_a", storage=f"sqlite:///{other / 'optuna.db'}")
    assert [t.params for t in replay.trials] == params[:2]


def test_grid_search_runs_each_point_once_and_stops_when_the_grid_is_done(tmp_path, stores):
    """n_trials above the grid's size: every point once, then the study stops (no repeated points)."""
    space = {"solver.name": {"type": "categorical", "choices": ["euler", "dpmpp3m"]},
             "loss.name": {"type": "categorical", "choices": ["l1", "l2"]}}
    path = _write_study(tmp_path, "grid_a", kind="search", rows=None, space=space, n_trials=6,
                        sampler={"type": "grid", "seed": 0})
    out = studies.run_study(str(path), quiet=True)
    assert not out.failed
    trials = optuna.load_study(study_name="grid_a", storage=out.storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert sorted((t.params["solver.name"], t.params["loss.name"]) for t in trials) == [
        ("dpmpp3m", "l1"), ("dpmpp3m", "l2"), ("euler", "l1"), ("euler", "l2")]
    assert studies.run_study(str(path), quiet=True).failed == []  # a rerun: nothing left to try
    assert len(optuna.load_study(study_name="grid_a", storage=out.storage).trials) == 4


@pytest.mark.parametrize("edit,message", [
    ({"kind": "ablations"}, "kind: got 'ablations'"),
    ({"objectve": {"metric": "fid"}}, "unknown field 'objectve'; did you mean objective?"),
    ({"objective": {"metric": "FID"}}, "objective.metric: got 'FID'"),
    ({"overrides": {"student.tmin": 0.01}}, "unknown config key 'student.tmin'"),
    ({"rows": [{"id": "a", "params": {"loss.name": "l3"}}]}, "row a: loss.name: got 'l3'"),
    ({"rows": [{"id": "a", "params": {"student.nfe": 0}}]}, "row a: student.nfe: got 0"),
    ({"sampler": {"type": "tpe"}}, "a study with rows: uses 'rows'"),
    ({"objective": {"metric": "fd_digits"}}, "row sfd-l1: objective ['fd_digits'] is not among the metrics"),
    ({"skip_rows": {"sfd-l3": "typo"}},
     "skip_rows: 'sfd-l3' is not a row id of this study; did you mean sfd-l1? rows: sfd-l1, sfd-l2-noafs, diverges"),
    ({"skip_rows": ["sfd-l1"]}, "skip_rows: expected a mapping of row ids to reasons, got ['sfd-l1']"),
    ({"rows": [{"id": "a", "params": {"student.guidance": 2.0}}]}, "row a: student.guidance: got 2.0"),
    ({"seeds": [0, 0]}, "seeds: got [0, 0]; 1 to 100 distinct integers"),
    ({"seeds": []}, "seeds: got []; 1 to 100 distinct"),
    ({"seeds": [0, True]}, "seeds: got [0, True]"),
    ({"seeds": [0, -1]}, "seeds: got [0, -1]; 1 to 100 distinct integers in [0, 2**63)"),
    ({"seeds": [[0]]}, "seeds: got [[0]]; 1 to 100 distinct integers"),  # was a TypeError traceback
    ({"seeds": [2**64]}, "seeds: got [18446744073709551616]; 1 to 100 distinct integers in [0, 2**63)"),
    ({"seeds": list(range(101))}, "seeds: got [0, 1, 2,"),
    ({"name": "x" * 300}, "name: got a name of 300 characters; at most 128"),
    ({"sampler": {"type": "rows", "seed": 2**40}}, "sampler.seed: got 1099511627776; an integer in 0..2**32-1"),
    ({"rows": [{"id": "r" * 65, "params": {}}]}, "has 65 characters; at most 64"),
    ({"base": ["experiments/digits_sfd.yaml"]}, "base: got ['experiments/digits_sfd.yaml']; the path of an"),
    ({"objective": "teacher_gap_mean"}, "objective: expected a mapping with keys metric, metrics, direction, "
                                        "directions, got 'teacher_gap_mean'"),
    ({"objective": {"metric": "teacher_gap_mean", "directon": "maximize"}},
     "objective: unknown key 'directon'; did you mean direction?"),
    ({"sampler": "rows"}, "sampler: expected a mapping with keys type, seed, got 'rows'"),
    ({"sampler": {"type": "rows", "sed": 3}}, "sampler: unknown key 'sed'; did you mean seed?"),
    ({"rows": [{"id": 1, "params": {}}]}, "rows[0]: id must be a non-empty string, got 1 (quote it: id: '1')"),
    ({"rows": [{"id": ["a"], "params": {}}]}, "rows[0]: id must be a non-empty string, got ['a']"),
    ({"name": "../elsewhere"}, "name: got '../elsewhere'; letters, digits, '_', '.' and '-' only"),
    ({"name": "."}, "name: got '.'; letters, digits"),
    ({"name": 5}, "name: got 5; letters"),
    ({"kind": "search"}, "kind: 'search' searches a space:; a study with rows: is an ablation or a comparison"),
    ({"n_trials": 1}, "n_trials: a table study runs each of its rows once; to run fewer now, pass --n-trials N"),
    ({"base": "experiments"}, "base: 'experiments' is a folder; name an experiments/*.yaml file"),
])
def test_bad_study_yaml_fails_clearly_and_creates_nothing(tmp_path, stores, edit, message):
    path = _write_study(tmp_path, **edit)
    with pytest.raises(ValueError) as err:
        studies.run_study(str(path), quiet=True)
    assert message in str(err.value)
    assert not stores.exists()


def test_replicate_seeds_run_each_row_per_seed_and_report_mean_and_sd(tmp_path, stores):
    """`seeds:` runs every row once per seed (the seed reaches the run's config), a rerun repeats nothing,
    and the report's cell is the mean ± sd over the seeds' tracked values with every seed's run linked."""
    from reports import build as rb

    path = _write_study(tmp_path, "reps", rows=ROWS[:2], seeds=[0, 3])
    out = studies.run_study(str(path), quiet=True)
    assert out.ran == 4 and not out.failed
    tracking, storage = _uris(stores)
    trials = optuna.load_study(study_name="reps", storage=storage).get_trials()
    assert sorted((t.user_attrs["row"], t.user_attrs["seed"]) for t in trials) == [
        ("sfd-l1", 0), ("sfd-l1", 3), ("sfd-l2-noafs", 0), ("sfd-l2-noafs", 3)]
    client = MlflowClient(tracking)
    runs = {(r.data.tags["sfd.row"], r.data.params["seed"]): r
            for r in client.search_runs([client.get_experiment_by_name("reps").experiment_id],
                                        filter_string="tags.`sfd.role` = 'trial'")}
    assert set(runs) == {("sfd-l1", "0"), ("sfd-l1", "3"), ("sfd-l2-noafs", "0"), ("sfd-l2-noafs", "3")}
    a, b = (runs[("sfd-l1", s)].data.metrics["teacher_gap_mean"] for s in ("0", "3"))
    assert a != b  # the seed changed the run, not only its label

    assert studies.run_study(str(path), quiet=True).ran == 0
    md = rb.build_report("reps", storage=storage, tracking_uri=tracking, out_dir=tmp_path / "out",
                         execute_notebook=False, log_to_mlflow=False).read_text()
    line = next(x for x in md.splitlines() if x.startswith("| SFD") and "L1" in x)
    mean, sd = (a + b) / 2, abs(a - b) / 2 ** 0.5
    assert f"{rb.fmt_value(mean)} ± {rb.fmt_value(sd)} (n=2)" in line
    assert (f"`{runs[('sfd-l1', '0')].info.run_id}` (seed 0), `{runs[('sfd-l1', '3')].info.run_id}` (seed 3)"
            in line)  # every seed's run is linked
    assert "**Seed noise:** each row ran with up to 2 seeds" in md
    every_run = md[md.index("## All tracked runs"):]
    assert "| run id | row | seed | trial |" in every_run and "| sfd-l1 | 3 |" in every_run


def test_seeds_option_replicates_any_table_study_as_a_study_of_its_own(tmp_path, stores):
    from reports import build as rb

    path = _write_study(tmp_path, "plain", rows=ROWS[:1])
    out = studies.run_study(str(path), quiet=True, seeds=[1, 2])
    assert out.experiment == "plain-seeds-1-2" and out.ran == 2 and not out.failed
    saved = yaml.safe_load((stores / "studies" / "plain-seeds-1-2.yaml").read_text())
    assert saved["seeds"] == [1, 2] and saved["rows"] == ROWS[:1] and Path(saved["base"]).is_absolute()
    tracking, storage = _uris(stores)
    md = rb.build_report("plain-seeds-1-2", storage=storage, tracking_uri=tracking, out_dir=tmp_path / "out",
                         execute_notebook=False, log_to_mlflow=False).read_text()
    assert "(n=2)" in md and "(seed 1), `" in md and "(seed 2)" in md
    assert MlflowClient(tracking).get_experiment_by_name("plain") is None  # the single-seed study is untouched


@pytest.mark.parametrize("how", ["yaml", "option"])
def test_replicates_are_refused_for_a_search(tmp_path, stores, how):
    path = _write_study(tmp_path, kind="search", rows=None, sampler={"type": "tpe", "seed": 0}, n_trials=2,
                        seeds=[0, 1] if how == "yaml" else None,
                        space={"loss.name": {"type": "categorical", "choices": ["l1", "l2"]}})
    with pytest.raises(ValueError, match="seeds: replicates are for table studies"):
        studies.run_study(str(path), quiet=True, seeds=[0, 1] if how == "option" else None)
    assert not stores.exists()


def test_a_second_live_process_is_refused_before_it_touches_the_study(tmp_path, stores):
    """Resuming marks RUNNING trials as interrupted, so a second process on a study that is running would fail
    the first one's trial: it is refused instead (here the test holds the lock a running study would hold)."""
    path = _write_study(tmp_path, "busy", rows=ROWS[:1])
    tracking, storage = _uris(stores)
    with study_lock("busy", storage):
        with pytest.raises(studies.StudyError, match=r"already being run by process \d+"):
            studies.run_study(str(path), quiet=True)
        assert not (stores / "optuna.db").exists() and not (stores / "mlflow.db").exists()
    assert studies.run_study(str(path), quiet=True).ran == 1  # free again once the holder is gone


@pytest.mark.parametrize("n", [0, -1])
def test_n_trials_below_one_is_refused_before_anything_is_created(tmp_path, stores, capsys, n):
    path = _write_study(tmp_path, rows=ROWS[:1])
    with pytest.raises(SystemExit) as exit_:
        script.main([str(path), "--n-trials", str(n)])
    assert exit_.value.code == 2 and f"--n-trials: got {n}; a positive integer" in capsys.readouterr().err
    with pytest.raises(studies.StudyError, match=f"n_trials: got {n}; a positive integer"):
        studies.run_study(str(path), quiet=True, n_trials=n)
    assert not stores.exists()


def test_lock_and_seeds_yaml_live_beside_a_sqlite_storage(tmp_path, stores):
    """`--storage` elsewhere takes the study's own files with it; the default runs/ folder stays untouched."""
    path = _write_study(tmp_path, "plain", rows=ROWS[:1])
    other = tmp_path / "other"
    storage = f"sqlite:///{other / 'optuna.db'}"
    out = studies.run_study(str(path), quiet=True, seeds=[1], storage=storage,
                            tracking_uri=f"sqlite:///{other / 'mlflow.db'}")
    assert out.ran == 1 and not out.failed
    assert (other / "studies" / "plain-seeds-1.yaml").is_file()
    assert study_home(storage) == other.resolve()
    assert len(list((other / ".locks").glob("plain-seeds-1-*.lock"))) == 1
    assert not stores.exists()


def test_ctrl_c_or_sigterm_in_a_trial_ends_its_run_killed_and_a_rerun_retries_it(tmp_path, stores, monkeypatch):
    """What SIGTERM raises (sfd.signals.Terminated, a KeyboardInterrupt) mid-training: the trial's run and the
    study's run end KILLED, the trial FAIL marked interrupted; the next run of the study retries its row."""
    import sfd.runner.run
    from sfd.signals import Terminated

    path = _write_study(tmp_path, "stopped", rows=ROWS[:1])
    real = sfd.runner.run.distill

    def stop(*args, **kwargs):
        raise Terminated("stopped by SIGTERM")

    monkeypatch.setattr(sfd.runner.run, "distill", stop)
    with pytest.raises(Terminated):
        studies.run_study(str(path), quiet=True)
    tracking, storage = _uris(stores)
    client = MlflowClient(tracking)
    (trial,) = optuna.load_study(study_name="stopped", storage=storage).get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["interrupted"] is True
    assert "Terminated: stopped by SIGTERM" in trial.user_attrs["fail_reason"]
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.info.end_time and run.data.tags["sfd.error"].startswith("Terminated")
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED" and parent.info.end_time

    monkeypatch.setattr(sfd.runner.run, "distill", real)
    again = studies.run_study(str(path), quiet=True)
    assert again.ran == 1 and not again.failed
    states = [t.state for t in optuna.load_study(study_name="stopped", storage=storage).get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    assert client.get_run(again.parent_run_id).info.status == "FINISHED"


def _env(runs: Path, **extra) -> dict:
    env = {**os.environ, "SFD_RUNS_DIR": str(runs), "MLFLOW_DISABLE_TELEMETRY": "true", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_cli_list_and_missing_asset(tmp_path):
    listing = subprocess.run([sys.executable, str(RUN_PY), "--list"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert {"ablation_cifar", "comparison_cifar", "ablation_imagenet64", "comparison_imagenet64",
            "ablation_digits", "search_digits"} <= set(names)
    assert len(names) == len(list((ROOT / "studies").glob("*.yaml")))
    runs = tmp_path / "runs"
    env = _env(runs, SFD_HOME=str(tmp_path / "no-assets"), TORCH_HOME=str(tmp_path / "no-torch"))
    proc = subprocess.run([sys.executable, str(RUN_PY), "ablation_cifar"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2
    assert "asset 'edm-cifar10-32x32-uncond-vp'" in proc.stderr and "python -m sfd.assets fetch" in proc.stderr
    assert not runs.exists()  # no MLflow experiment, no Optuna study


def test_sigkill_mid_trial_then_rerun_completes_without_duplicates(tmp_path):
    """Kill the study process (SIGKILL: no cleanup) while its first trial is running; the same command then
    marks that trial and its MLflow run FAILED, reruns its row and finishes the others, each row once."""
    # ~400 iterations, about 3 s here: time to kill it mid-trial (100 used to do, while the first imports of the
    # evaluation and plotting modules still happened inside the trial)
    rows = [{"id": "slow", "params": {"optim.total_kimg": 6.4}},
            {"id": "quick", "params": {"loss.name": "l2"}}]
    path = _write_study(tmp_path, "killme", rows=rows)
    runs = tmp_path / "runs"
    tracking, storage = _uris(runs)
    runs.mkdir()
    # Create the Optuna schema before the study process starts: polling a fresh sqlite file while the child
    # creates the same tables races on Optuna's alembic_version row (UNIQUE constraint failed).
    optuna.storages.RDBStorage(storage)
    # in the study process (its runs die with it): workers, which end their runs themselves, are test_parallel_study's
    cmd = [sys.executable, str(RUN_PY), str(path), "--no-report", "--devices", "serial"]
    proc = subprocess.Popen(cmd, env=_env(runs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    killed_run = None
    try:
        while time.time() < deadline and killed_run is None:
            time.sleep(0.5)
            assert proc.poll() is None, "the study finished before it could be killed"
            if not (runs / "optuna.db").exists():
                continue
            try:
                trials = optuna.load_study(study_name="killme", storage=storage).get_trials()
            except KeyError:  # study not created yet
                continue
            running = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
            if running:
                killed_run = running[0].user_attrs["mlflow_run_id"]
                time.sleep(1.0)  # well inside the trial's training loop
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_run is not None and proc.returncode == -signal.SIGKILL
    client = MlflowClient(tracking)
    assert client.get_run(killed_run).info.status == "RUNNING"  # left behind by the dead process

    done = subprocess.run(cmd, env=_env(runs), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 interrupted trial(s) marked FAILED" in done.stdout
    trials = optuna.load_study(study_name="killme", storage=storage).get_trials()
    complete = [t.user_attrs["row"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == ["quick", "slow"]  # every row exactly once
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["mlflow_run_id"] == killed_run
    assert failed[0].user_attrs["interrupted"] is True and "interrupted" in failed[0].user_attrs["fail_reason"]
    killed = client.get_run(killed_run)
    assert killed.info.status == "FAILED" and killed.data.tags["sfd.error"].startswith("interrupted")
    exp = client.get_experiment_by_name("killme")
    every = client.search_runs([exp.experiment_id])
    assert not [r for r in every if r.info.status == "RUNNING"]
    assert len([r for r in every if r.data.tags.get("sfd.role") == "study"]) == 1
    assert len([r for r in every if r.data.tags.get("sfd.role") == "trial"]) == 3  # 2 rows + the killed try

    rerun = subprocess.run(cmd, env=_env(runs), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "0 trial(s) to run" in rerun.stdout
    assert len(optuna.load_study(study_name="killme", storage=storage).trials) == 3


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ablation_cifar_smoke_cli_end_to_end(tmp_path):
    """Proves the CIFAR-10 wiring (SongUNet teacher, all 11 rows incl. vanilla on stand-in images, MLflow,
    Optuna, report) on a random network: `python studies/run.py ablation_cifar --smoke`. Not a result."""
    runs = tmp_path / "runs"
    env = _env(runs, TORCH_HOME=str(tmp_path / "torch-home"))  # no LPIPS weights: that row trains L2, and says so
    proc = subprocess.run([sys.executable, str(RUN_PY), "ablation_cifar", "--smoke", "--out", str(tmp_path / "report")],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tracking, storage = _uris(runs)
    study = optuna.load_study(study_name="ablation_cifar-smoke", storage=storage)
    rows = [r["id"] for r in yaml.safe_load((ROOT / "studies" / "ablation_cifar.yaml").read_text())["rows"]]
    assert len(rows) == 11
    assert [t.user_attrs["row"] for t in study.trials] == rows
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    client = MlflowClient(tracking)
    assert client.get_experiment_by_name("ablation_cifar") is None  # smoke never mixes with real results
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["sfd.smoke"] == "true" and "teacher_gap" in run.data.tags["sfd.smoke.metric.fid"]
        assert run.data.params["teacher.name"] == "cifar10-uncond" and run.data.params["smoke"] == "True"
        assert "fid" not in run.data.metrics and run.data.metrics["objective"] == run.data.metrics["teacher_gap_mean"]
    vanilla = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert vanilla.data.params["algorithm"] == "vanilla" and vanilla.data.params["vanilla.data"] == "dataset"
    report = (tmp_path / "report" / "report.md").read_text()
    lpips = next(t for t in study.trials if t.user_attrs["row"] == "sfd-dpmpp3m-0.006-afs-lpips")
    assert client.get_run(lpips.user_attrs["mlflow_run_id"]).data.params["loss.name"] == "l2"
    assert report.count("LPIPS (smoke run trained L2: weights not installed)") >= 1


@pytest.mark.parametrize("name,lr", [("comparison_cifar", 5e-5), ("comparison_imagenet64", 1e-5)])
def test_paper_comparison_rows_train_with_the_papers_budgets(name, lr):
    """Spec §8: 200 kimg for an SFD student, 800 for SFD-v, 2000 (lr 5e-4) for the second stage."""
    spec = studies.load_spec(name)
    budgets = {}
    for row in spec.rows:
        cfg = row_config(spec, row)
        budgets[cfg.algorithm] = budgets.get(cfg.algorithm, set()) | {(cfg.optim.total_kimg, cfg.optim.lr)}
    assert budgets["sfd"] == {(200, lr)}
    assert budgets["sfd-v"] == {(800, lr)}
    assert budgets["second-stage"] == {(2000, 5e-4)}


# ----- --dry-run: the plan, checked against what the run then does ---------------------------------------------

def _plan(path, **kw) -> dict:
    plan = studies.plan_study(str(path), **kw)
    return {label: what for label, what, _ in plan.lines}, plan


def test_dry_run_prints_every_row_and_creates_nothing(tmp_path, stores, capsys):
    skipped = {"id": "skipped", "params": {"loss.name": "lpips"}}
    path = _write_study(tmp_path, rows=ROWS + [skipped], skip_rows={"skipped": "not on a CPU"})
    assert script.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "study mini: dry run, nothing created. 3 trial(s) would run now." in out
    assert "study 'mini': new" in out
    lines = {line.split()[0]: line for line in out.splitlines()[3:]}
    assert lines["sfd-l1"].split("  ")[-1] == "runs"
    assert "sfd dpmpp3m NFE 2 t_min 0.006 AFS no l2 0.048 kimg" in lines["sfd-l2-noafs"]
    assert lines["skipped"].endswith("skipped: not on a CPU")
    assert not stores.exists()


def test_dry_run_reports_done_interrupted_queued_and_failed_rows_as_the_run_then_finds_them(tmp_path, stores,
                                                                                              monkeypatch):
    path = _write_study(tmp_path, rows=ROWS)
    assert studies.run_study(str(path), quiet=True, n_trials=1).ran == 1  # sfd-l1; the rest queued
    stop_next_training(monkeypatch, lambda: studies.run_study(str(path), quiet=True))  # sfd-l2-noafs
    storage = f"sqlite:///{stores / 'optuna.db'}"
    before = optuna.load_study(study_name="mini", storage=storage).get_trials()

    rows, plan = _plan(path)
    first = before[0]
    assert rows == {"sfd-l1": f"done: teacher_gap_mean={first.value:.4g} (trial 0)",
                    "sfd-l2-noafs": "runs again (interrupted)", "diverges": "queued"}
    assert (plan.on_record, plan.to_run, plan.running_elsewhere) == (3, 2, None)
    rows, plan = _plan(path, n_trials=1)  # the queued row goes first, as Optuna asks in trial order
    assert rows["sfd-l2-noafs"] == "waits: beyond --n-trials 1" and plan.to_run == 1
    assert len(optuna.load_study(study_name="mini", storage=storage).get_trials()) == len(before)  # nothing queued

    out = studies.run_study(str(path), quiet=True)
    assert out.ran == 2 and [n for n, _ in out.failed] == [2]  # the queued diverging row
    rows, plan = _plan(path)
    assert rows["diverges"].startswith("failed, kept (--retry-failed runs it again): DivergedError")
    assert rows["sfd-l2-noafs"].startswith("done: teacher_gap_mean=") and plan.to_run == 0
    rows, plan = _plan(path, retry_failed=True)
    assert rows["diverges"] == "runs again (--retry-failed)" and plan.to_run == 1
    assert studies.run_study(str(path), quiet=True, retry_failed=True).ran == 1


def test_dry_run_says_when_another_process_is_running_the_study(tmp_path, stores):
    path = _write_study(tmp_path, "busy", rows=ROWS[:1])
    with study_lock("busy", f"sqlite:///{stores / 'optuna.db'}"):
        _, plan = _plan(path)
    assert plan.running_elsewhere.startswith(f"process {os.getpid()} (started ")
    assert _plan(path)[1].running_elsewhere is None


def test_dry_run_of_a_search_counts_the_trials_left(tmp_path, stores):
    space = {"loss.name": {"type": "categorical", "choices": ["l1", "l2"]}}
    path = _write_study(tmp_path, "s", kind="search", rows=None, space=space, sampler={"type": "tpe", "seed": 1},
                        n_trials=2)
    rows, plan = _plan(path)
    assert plan.to_run == 2 and rows["next"].startswith("2 trial(s): tpe sampler (seed 1) over loss.name in ['l1'")
    assert studies.run_study(str(path), quiet=True, n_trials=1).ran == 1
    rows, plan = _plan(path)
    assert plan.to_run == 1 and rows["trial 0"].startswith("done: teacher_gap_mean=")
    assert studies.run_study(str(path), quiet=True).ran == plan.to_run


SEARCH = dict(kind="search", rows=None, sampler={"type": "tpe", "seed": 0}, n_trials=2)


@pytest.mark.parametrize("edit,message", [
    ({"space": {"student.t_min": {"type": "float", "low": 0.002, "high": 0.05, "lgo": True}}},
     "space.student.t_min: unknown key 'lgo' for a float distribution; allowed: type, low, high, log"),
    ({"space": {"loss.name": {"type": "categorical", "choices": "l1"}}},
     "space.loss.name: categorical needs a non-empty choices list, got 'l1'"),
    ({"space": {"student.t_min": {"type": "float", "low": "1e-3x", "high": 0.05}}},
     "space.student.t_min.low: got '1e-3x'; a finite number"),
    ({"space": {"student.nfe": {"type": "int", "low": 1.5, "high": 4}}},
     "space.student.nfe.low: got 1.5; a finite integer"),
    ({"space": {"student.t_min": {"type": "float", "low": 0.002, "high": 0.05, "log": "yes"}}},
     "space.student.t_min.log: got 'yes'; true or false"),
    ({"n_trials": True, "space": {"loss.name": {"type": "categorical", "choices": ["l1"]}}},
     "n_trials: got True; an integer in 1..10,000"),
    ({"kind": "ablation", "space": {"loss.name": {"type": "categorical", "choices": ["l1"]}}},
     "kind: 'ablation' is a table study with rows:; a space: is searched by kind 'search'"),
    # every NFE of a short range is checked, not only its ends: Heun without AFS spends an even number
    ({"overrides": {**TINY, "algorithm": "baseline", "solver.name": "heun", "student.afs": False},
      "space": {"student.nfe": {"type": "int", "low": 2, "high": 6}}}, "space.student.nfe=3"),
])
def test_bad_search_space_fails_clearly_and_creates_nothing(tmp_path, stores, edit, message):
    path = _write_study(tmp_path, "s", **{**SEARCH, **edit})
    with pytest.raises(ValueError) as err:
        studies.run_study(str(path), quiet=True)
    assert message in str(err.value)
    assert not stores.exists()


def test_range_ends_written_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads `2e-3` as a string; a float range end means the number."""
    path = tmp_path / "s.yaml"
    path.write_text(_write_study(tmp_path, "s", **SEARCH, space={}).read_text().replace(
        "space: {}", "space:\n  student.t_min: {type: float, low: 2e-3, high: 5e-2, log: true}"))
    dist = studies.load_spec(str(path)).space["student.t_min"]
    assert (dist["low"], dist["high"]) == (0.002, 0.05)


@pytest.mark.parametrize("option,message", [
    ({"storage": "foo://bar"}, "Optuna storage 'foo://bar' (--storage): NoSuchModuleError"),
    ({"storage": "mysql://user@host/db"}, "Optuna storage 'mysql://user@host/db' (--storage): ModuleNotFoundError"),
    ({"tracking_uri": "foo://bar"}, "MLflow tracking URI 'foo://bar' (--tracking-uri): MLflow has no store for "
                                    "this scheme; it supports ["),
])
def test_unusable_store_urls_are_refused_before_anything_is_created(tmp_path, stores, option, message):
    path = _write_study(tmp_path, rows=ROWS[:1])
    for run in (studies.run_study, studies.plan_study):
        with pytest.raises(studies.StudyError) as err:
            run(str(path), **option, **({"quiet": True} if run is studies.run_study else {}))
        assert message in str(err.value)
    assert not stores.exists()


# ----- a resumed study against what it recorded ------------------------------------------------------------------

def test_a_row_edited_after_it_ran_is_refused_not_reported_under_its_new_settings(tmp_path, stores):
    path = _write_study(tmp_path, rows=ROWS[:2])
    assert studies.run_study(str(path), quiet=True).ran == 2
    edited = [{**ROWS[0], "params": {"loss.name": "l2"}}, ROWS[1]]
    _write_study(tmp_path, rows=edited)
    for run in (studies.run_study, studies.plan_study):
        with pytest.raises(studies.StudyError) as err:
            run(str(path), **({"quiet": True} if run is studies.run_study else {}))
        assert ("finished trials ran with settings the YAML no longer gives, so the report would show their "
                "results under settings they did not use: row 'sfd-l1' (loss.name: 'l1' -> 'l2')") in str(err.value)
        assert "give each changed row a new id" in str(err.value)
    _write_study(tmp_path, rows=ROWS[:2], overrides={**TINY, "optim.total_kimg": 0.064})  # the budget of both
    with pytest.raises(studies.StudyError, match=r"row 'sfd-l1' \(optim.total_kimg: 0.048 -> 0.064\), row "
                                                 r"'sfd-l2-noafs' \(optim.total_kimg: 0.048 -> 0.064\)"):
        studies.run_study(str(path), quiet=True)
    _write_study(tmp_path, rows=[{**edited[0], "id": "sfd-l1-as-l2"}, ROWS[1]])  # a new id: a new row
    out = studies.run_study(str(path), quiet=True)
    assert out.ran == 1 and not out.failed
    trials = optuna.load_study(study_name="mini", storage=out.storage).get_trials()
    assert trials[-1].user_attrs["row"] == "sfd-l1-as-l2"
    recorded = trials[-1].user_attrs["config"]
    assert recorded["loss.name"] == "l2" and all(recorded[k] == v for k, v in TINY.items())
    assert "device" not in recorded and "precision" not in recorded  # how it ran, not what it measured


def test_a_failed_row_edited_after_it_ran_reruns_with_retry_failed(tmp_path, stores):
    path = _write_study(tmp_path, rows=[ROWS[2]])
    assert [n for n, _ in studies.run_study(str(path), quiet=True).failed] == [0]
    _write_study(tmp_path, rows=[{**ROWS[2], "params": {**ROWS[2]["params"], "optim.lr": 1e-4}}])
    with pytest.raises(studies.StudyError, match="optim.lr: 1000000000000.0 -> 0.0001.*also reruns with "
                                                 "--retry-failed"):
        studies.run_study(str(path), quiet=True)
    out = studies.run_study(str(path), quiet=True, retry_failed=True)
    assert out.ran == 1 and not out.failed


def test_a_changed_objective_is_refused(tmp_path, stores):
    path = _write_study(tmp_path, rows=ROWS[:1])
    studies.run_study(str(path), quiet=True)
    _write_study(tmp_path, rows=ROWS[:1], objective={"metric": "teacher_gap_mean", "direction": "maximize"})
    with pytest.raises(studies.StudyError, match=r"its Optuna study optimises teacher_gap_mean \(minimize\), but "
                                                 r"the YAML now asks for teacher_gap_mean \(maximize\)"):
        studies.run_study(str(path), quiet=True)


def test_a_search_whose_overrides_changed_is_refused(tmp_path, stores):
    space = {"loss.name": {"type": "categorical", "choices": ["l1", "l2"]}}
    path = _write_study(tmp_path, "s", **{**SEARCH, "n_trials": 1}, space=space)
    assert studies.run_study(str(path), quiet=True).ran == 1
    _write_study(tmp_path, "s", **{**SEARCH, "n_trials": 2}, space=space)  # more trials: fine
    assert studies.plan_study(str(path)).to_run == 1
    _write_study(tmp_path, "s", **{**SEARCH, "n_trials": 2}, space=space, overrides={**TINY, "student.nfe": 3})
    with pytest.raises(studies.StudyError, match=r"trial 0 \(student.nfe: 2 -> 3\).*give the YAML a "
                                                 "new name: for a new search"):
        studies.run_study(str(path), quiet=True)


def test_an_out_that_is_a_file_is_refused_before_the_trials_run(tmp_path, stores, capsys):
    path = _write_study(tmp_path, rows=ROWS[:1])
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    for dry_run in ([], ["--dry-run"]):  # the dry run says what the run would say
        assert script.main([str(path), "--out", str(taken), *dry_run]) == 2
        assert re.search("error: --out: output folder .*a-file exists and is not a folder", capsys.readouterr().err)
    assert script.main([str(path), "--out", str(taken), "--dry-run", "--no-report"]) == 0
    assert not stores.exists()


def test_an_empty_or_broken_study_yaml_says_so(tmp_path):
    empty, broken, numbered = tmp_path / "empty.yaml", tmp_path / "broken.yaml", tmp_path / "numbered.yaml"
    empty.write_text("# nothing yet\n")
    broken.write_text("name: [unclosed\n")
    numbered.write_text("1: x\n")
    with pytest.raises(studies.StudyError, match="field names are words, got 1; allowed: name, kind"):
        studies.load_spec(str(numbered))
    with pytest.raises(studies.StudyError, match="empty.yaml is empty; a study YAML needs name, kind, base"):
        studies.load_spec(str(empty))
    with pytest.raises(studies.StudyError, match="broken.yaml: not valid YAML"):
        studies.load_spec(str(broken))
    with pytest.raises(studies.StudyError, match="is a folder; name a study"):
        studies.load_spec(str(tmp_path))


def test_experiments_run_refuses_an_unusable_tracking_uri_before_reading_the_config(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), str(tmp_path / "missing.yaml"),
                             "--tracking-uri", "foo://bar"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: MLflow tracking URI 'foo://bar' (--tracking-uri): MLflow has no store")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_row_fixed_and_retried_resumes_without_a_refusal(tmp_path, stores):
    """Only a row's latest outcome (the one its report shows) is compared with the YAML."""
    path = _write_study(tmp_path, rows=[ROWS[2]])
    studies.run_study(str(path), quiet=True)  # fails: diverges
    _write_study(tmp_path, rows=[{**ROWS[2], "params": {**ROWS[2]["params"], "optim.lr": 1e-4}}])
    assert studies.run_study(str(path), quiet=True, retry_failed=True).ran == 1
    out = studies.run_study(str(path), quiet=True)  # no edit since: nothing to refuse, nothing to run
    assert out.ran == 0 and not out.failed


def test_an_edit_that_leaves_the_runs_config_unchanged_is_not_refused_and_a_new_base_is(tmp_path, stores):
    path = _write_study(tmp_path, rows=ROWS[:1])
    studies.run_study(str(path), quiet=True)
    _write_study(tmp_path, rows=ROWS[:1], overrides={**TINY, "solver.m": 3})  # the base's value anyway
    assert studies.plan_study(str(path)).to_run == 0
    other = tmp_path / "other_base.yaml"
    other.write_text(GMM.read_text().replace("solver: {name: dpmpp3m, m: 3}", "solver: {name: dpmpp3m, m: 2}"))
    _write_study(tmp_path, rows=ROWS[:1], base=str(other))
    with pytest.raises(studies.StudyError, match=r"row 'sfd-l1' \(solver.m: 3 -> 2\)"):
        studies.plan_study(str(path))


def test_queued_rows_that_the_yaml_now_skips_or_drops_do_not_run(tmp_path, stores):
    path = _write_study(tmp_path, rows=ROWS[:2] + [{**ROWS[0], "id": "third"}])
    assert studies.run_study(str(path), quiet=True, n_trials=1).ran == 1  # the other two stay queued
    _write_study(tmp_path, rows=ROWS[:2], skip_rows={"sfd-l2-noafs": "not now"})  # skip one, drop "third"
    rows, plan = _plan(path)
    assert plan.to_run == 0 and rows["sfd-l2-noafs"] == "skipped: not now" and "third" not in rows
    out = studies.run_study(str(path), quiet=True)
    assert out.ran == 0 and not out.failed
    trials = optuna.load_study(study_name="mini", storage=out.storage).get_trials()
    assert [(t.user_attrs["row"], t.state, t.user_attrs["fail_reason"]) for t in trials[1:]] == [
        ("sfd-l2-noafs", TrialState.FAIL, "interrupted: not started: the study skips row 'sfd-l2-noafs' (not now)"),
        ("third", TrialState.FAIL, "interrupted: not started: the study YAML no longer has row 'third'")]
    _write_study(tmp_path, rows=ROWS[:2])  # skipped no more: it runs
    assert studies.run_study(str(path), quiet=True).ran == 1


def test_a_grid_point_stopped_right_after_asking_runs_next_time(tmp_path, stores, monkeypatch):
    space = {"loss.name": {"type": "categorical", "choices": ["l1", "l2"]}}
    path = _write_study(tmp_path, "g", **{**SEARCH, "n_trials": 2, "sampler": {"type": "grid", "seed": 0}}, space=space)
    stop_after_ask(monkeypatch, lambda: studies.run_study(str(path), quiet=True), at=2)
    assert studies.plan_study(str(path)).to_run == 1
    assert studies.run_study(str(path), quiet=True).ran == 1
    trials = optuna.load_study(study_name="g", storage=f"sqlite:///{stores / 'optuna.db'}").get_trials()
    assert sorted(t.params["loss.name"] for t in trials if t.state == TrialState.COMPLETE) == ["l1", "l2"]


def test_a_finished_row_now_skipped_is_not_checked_against_its_yaml(tmp_path, stores):
    path = _write_study(tmp_path, rows=ROWS[:2])
    assert studies.run_study(str(path), quiet=True, n_trials=1).ran == 1  # sfd-l1 finished
    _write_study(tmp_path, rows=[{**ROWS[0], "params": {"loss.name": "l3"}}, ROWS[1]],  # edited, even invalid
                 skip_rows={"sfd-l1": "set aside"})
    assert studies.run_study(str(path), quiet=True).ran == 1  # only sfd-l2-noafs
