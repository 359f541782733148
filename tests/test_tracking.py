"""MLflow logging from one module: run layout, batched metrics, provenance, FAILED runs, nothing half-created."""
import dataclasses
import getpass
import math
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from sfd import tracking as T
from sfd.assets import MissingAssetError
from sfd.config import flatten, load_config, to_dict
from sfd.distill import DivergedError, IterationStats
from sfd.runner import run_experiment
from sfd.runner.run import readable

ROOT = Path(__file__).resolve().parents[1]
GMM = ROOT / "experiments" / "gmm_sfd.yaml"
TINY = ["teacher.name=gmm-img-4", "optim.batch_size=16", "optim.total_kimg=0.08", "eval.num_samples=16",
        "eval.gap_nfe=10", "log.every=2"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("SFD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "runs"


def _client() -> MlflowClient:
    return MlflowClient(T.default_tracking_uri())


def _artifacts(client, run_id, path=None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_default_locations_follow_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SFD_RUNS_DIR", str(tmp_path / "r"))
    assert T.default_tracking_uri() == f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}"
    assert T.default_optuna_storage() == f"sqlite:///{tmp_path / 'r' / 'optuna.db'}"
    assert T.artifact_location(T.default_tracking_uri(), "exp") == (tmp_path / "r" / "artifacts" / "exp").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert T.default_tracking_uri() == "http://mlflow.example:5000"
    assert T.artifact_location("http://mlflow.example:5000", "exp") is None  # the server decides
    monkeypatch.delenv("SFD_RUNS_DIR")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert T.default_tracking_uri() == f"sqlite:///{ROOT / 'runs' / 'mlflow.db'}"


def test_provenance_tags():
    git = T.git_info()
    assert re.fullmatch(r"[0-9a-f]{40}", git["git.commit"]) and git["git.dirty"] in ("true", "false")
    versions = T.package_versions()
    assert versions["version.torch"] == torch.__version__.split("+")[0] or versions["version.torch"] == torch.__version__
    assert {"version.sfd", "version.mlflow", "version.optuna", "version.python"} <= set(versions)


def _stats(i, losses):
    return IterationStats(iteration=i, kimg=(i + 1) * 0.016, lr=1e-3, num_steps=4,
                          step_losses=torch.tensor(losses), teacher_seconds=0.5, student_seconds=0.25)


def test_iteration_metrics_are_batched_and_keyed_by_student_step(store):
    tracker = T.Tracker("unit")
    run = tracker.start_run("batched", every=4)
    calls = []
    original = run.client.log_batch
    run.client.log_batch = lambda *a, **k: (calls.append(len(k.get("metrics", ()))), original(*a, **k))[1]
    callback = run.iteration_callback(afs=True, loss="l1")
    for i in range(10):
        callback(_stats(i, [1.0 + i, 2.0 + i]))
    assert len(calls) == 2  # iterations 0-3 and 4-7, one write each; 8-9 still buffered
    run.end()
    assert len(calls) == 3  # the rest on end
    client = _client()
    hist = client.get_metric_history(run.run_id, "train/loss_l1/step_1")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(i, 1.0 + i) for i in range(10)]
    assert len(client.get_metric_history(run.run_id, "train/loss_l1/step_2")) == 10
    keys = set(client.get_run(run.run_id).data.metrics)
    assert {"train/loss_l1", "lr", "kimg", "time/teacher_s", "time/student_s"} <= keys
    assert "train/loss_l1/step_0" not in keys and "loss" not in keys  # the AFS step trains nothing; no bare loss
    assert client.get_run(run.run_id).info.status == "FINISHED"

    run2 = tracker.start_run("no-afs-vanilla", every=50)
    cb = run2.iteration_callback(afs=False, loss="l2")
    cb(_stats(0, [3.0, 4.0]))
    cb_vanilla = run2.iteration_callback(afs=False, loss="l2", per_step=False)
    cb_vanilla(_stats(1, [5.0]))
    # Algorithm 1 trains one random step per iteration: its loss is keyed by the step it drew.
    cb(dataclasses.replace(_stats(2, [7.0]), step_indices=(2,)))
    run2.end()
    hist0 = client.get_metric_history(run2.run_id, "train/loss_l2/step_0")
    assert [m.value for m in hist0] == [3.0]  # without AFS the first step is step 0
    assert [(m.step, m.value) for m in client.get_metric_history(run2.run_id, "train/loss_l2/step_2")] == [(2, 7.0)]
    assert sorted(m.value for m in client.get_metric_history(run2.run_id, "train/loss_l2")) == [3.5, 5.0, 7.0]


def test_failing_run_ends_failed_with_its_error(store):
    tracker = T.Tracker("unit")
    with pytest.raises(RuntimeError):
        with tracker.start_run("boom") as run:
            run.log_params({"a": 1})
            raise RuntimeError("exploded on purpose")
    info = _client().get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert info.data.tags[T.TAG_ERROR] == "RuntimeError: exploded on purpose"
    assert "error.txt" in _artifacts(_client(), run.run_id)


def test_study_parent_run_is_reused_by_id_never_found_by_name(store):
    """The parent is the one the Optuna study recorded (its id); a study of the same name in another Optuna
    storage (no id, or an id of another study) gets a parent of its own."""
    client = T.get_client()
    first = T.study_parent_run(client, "exp", "s", {T.TAG_KIND: "ablation"})
    client.set_terminated(first, "FINISHED")
    again = T.study_parent_run(client, "exp", "s", {T.TAG_KIND: "ablation"}, run_id=first)
    assert first == again and client.get_run(first).info.status == "RUNNING"
    exp = client.get_experiment_by_name("exp")
    assert len(client.search_runs([exp.experiment_id])) == 1
    other_storage = T.study_parent_run(client, "exp", "s", {})  # same name, no recorded parent: a new one
    assert other_storage != first
    assert T.study_parent_run(client, "exp", "t", {}, run_id=first) != first  # another study's parent is not reused
    assert T.study_parent_run(client, "exp", "s", {}, run_id="0" * 32) not in (first, other_storage)  # unknown id
    quoted = T.study_parent_run(client, "exp", "bob's study", {})  # a quote in the name used to break the filter
    assert T.study_parent_run(client, "exp", "bob's study", {}, run_id=quoted) == quoted


def test_a_trials_runs_are_found_by_their_tags_beyond_the_first_page(store, monkeypatch):
    """A trial's runs are found by the tags they are created with (parent, trial number), also the newest one
    when the parent has more children than one search page holds."""
    client = T.get_client()
    parent = T.study_parent_run(client, "exp", "s", {})
    exp_id = client.get_experiment_by_name("exp").experiment_id
    children = [client.create_run(exp_id, tags={T.TAG_PARENT: parent, T.TAG_TRIAL: str(i % 2)}).info.run_id
                for i in range(5)]
    real_find = T.find_runs
    monkeypatch.setattr(T, "find_runs", lambda *a, **k: real_find(*a, **{**k, "page_size": 2}))
    assert [r.info.run_id for r in T.trial_runs(client, exp_id, parent, 0)] == children[0::2]
    assert [r.info.run_id for r in T.trial_runs(client, exp_id, parent, 1)] == children[1::2]


def test_a_run_whose_process_is_gone_is_marked_failed_by_the_next_start_on_its_host(store):
    """Every run records its host, pid and the pid's start time; a run still RUNNING whose process has ended (or
    whose pid now belongs to a newer process) ends FAILED, a live one and another host's are left alone."""
    import socket
    import subprocess
    import sys

    client = T.get_client()
    exp_id = T.get_or_create_experiment(client, "exp")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    me = T.process_tags()
    assert me == {T.TAG_HOST: host, T.TAG_PID: str(os.getpid()), T.TAG_PID_START: me[T.TAG_PID_START]}
    runs = {
        "dead": {T.TAG_HOST: host, T.TAG_PID: str(gone.pid), T.TAG_PID_START: "1.0"},
        "reused pid": {**me, T.TAG_PID_START: f"{float(me[T.TAG_PID_START]) - 3600:.2f}"},
        "alive": me,
        "elsewhere": {**me, T.TAG_HOST: host + "-other", T.TAG_PID: str(gone.pid)},
        "no process": {},  # a study's parent run: peers share it
    }
    ids = {name: client.create_run(exp_id, tags=tags).info.run_id for name, tags in runs.items()}
    assert sorted(T.fail_orphaned_runs(client)) == sorted([ids["dead"], ids["reused pid"]])
    for name in ("dead", "reused pid"):
        run = client.get_run(ids[name])
        assert run.info.status == "FAILED" and run.data.tags[T.TAG_ERROR].startswith("interrupted: its process is gone")
    assert {client.get_run(ids[n]).info.status for n in ("alive", "elsewhere", "no process")} == {"RUNNING"}


def test_run_experiment_logs_the_contract_layout(store):
    """One real (tiny, GMM) run: every config field as a param, per-iteration and final metrics, artifacts
    that replay the run and hold the student, provenance tags."""
    cfg = load_config(GMM, TINY)
    tracker = T.Tracker("layout", tags={"sfd.study": "unit"}, objective=["teacher_gap_mean"])
    result = run_experiment(cfg, tracker=tracker)
    client = _client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.name
    params = run.data.params
    assert set(flatten(to_dict(result.config))) <= set(params)
    assert params["student.nfe"] == "2" and params["solver.name"] == "dpmpp3m" and params["eval.num_samples"] == "16"
    m = run.data.metrics
    for key in ("teacher_gap_mean", "teacher_gap_std", "nfe", "train/wall_s", "train/cpu_s", "train/device_hours",
                "eval/wall_s", "total/wall_s", "objective", "train/loss_l1", "train/loss_l1/step_1",
                "train/loss_l1/step_2", "lr", "time/teacher_s", "time/student_s"):
        assert key in m, key
    assert m["objective"] == m["teacher_gap_mean"] == result.metrics["teacher_gap_mean"]
    assert m["nfe"] == 2 and m["train/device_hours"] == pytest.approx(m["train/cpu_s"] / 3600)  # processor time
    assert len(client.get_metric_history(result.run_id, "train/loss_l1/step_1")) == 5  # 80 trajectories / batch 16
    tags = run.data.tags
    assert tags["sfd.smoke"] == "false" and tags["sfd.study"] == "unit" and tags["sfd.seed"] == "0"
    assert tags["sfd.device"] == "cpu" and tags["sfd.role"] == "run" and tags["sfd.threads"] == "1"
    assert {"git.commit", "git.dirty", "version.torch", "version.sfd"} <= set(tags)
    assert tags["sfd.pid"] == str(os.getpid()) and tags["sfd.host"] and float(tags["sfd.pid_start"]) > 0
    # MLflow's own source tags, which its UI shows (the run was started by pytest's entry point here)
    assert tags["mlflow.source.git.commit"] == tags["git.commit"] and re.fullmatch(r"[0-9a-f]{40}", tags["git.commit"])
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.name"] == T.source_tags({"git.commit": "x"})["mlflow.source.name"] != ""
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens the runs, not GenAI
    files = _artifacts(client, result.run_id)
    assert {"config.yaml", "samples.png", "loss_curve.png", "student/student.safetensors",
            "student/sampling.json"} <= files
    local = Path(client.download_artifacts(result.run_id, "config.yaml", str(store.parent / "dl")))
    assert load_config(local) == result.config  # the logged YAML replays exactly this run
    sampling = yaml.safe_load(Path(client.download_artifacts(result.run_id, "student/sampling.json",
                                                             str(store.parent / "dl"))).read_text())
    assert sampling["grid"]["num_steps"] == 4 and sampling["grid"]["afs"] is True and sampling["nfe"] == 2
    # the grid of 16 8x8 samples (4 x 9 + 1 = 37 pixels a side) is logged enlarged 14x, each pixel a 14x14 block
    png = np.asarray(Image.open(client.download_artifacts(result.run_id, "samples.png", str(store.parent / "dl"))))
    assert png.shape[:2] == (37 * 14, 37 * 14)
    assert (png == np.repeat(np.repeat(png[::14, ::14], 14, axis=0), 14, axis=1)).all()


def test_small_sample_grids_are_enlarged_by_a_whole_factor_and_large_ones_kept():
    digits = Image.fromarray(np.arange(73 * 73, dtype=np.uint8).reshape(73, 73))  # 8x8 digits, 8 to a row
    big = readable(digits)
    assert big.size == (584, 584)  # 8x: the smallest whole factor reaching 512
    assert (np.asarray(big)[::8, ::8] == np.asarray(digits)).all()
    cifar = Image.new("RGB", (265, 265))  # 8 x 33 + 1
    assert readable(cifar).size == (530, 530)
    imagenet = Image.new("RGB", (521, 521))
    assert readable(imagenet) is imagenet


def test_baseline_run_samples_the_teacher_without_training(store):
    cfg = load_config(GMM, TINY + ["algorithm=baseline", "solver.name=heun", "student.nfe=4", "student.afs=false"])
    result = run_experiment(cfg, tracker=T.Tracker("layout"))
    run = _client().get_run(result.run_id)
    assert run.data.metrics["nfe"] == 4 and run.data.metrics["train/wall_s"] == 0
    assert "loss" not in run.data.metrics
    files = _artifacts(_client(), result.run_id)
    assert "samples.png" in files and not any(f.startswith("student") for f in files)


def test_diverging_run_is_failed_with_reason(store):
    cfg = load_config(GMM, ["teacher.name=gmm-8", "optim.lr=1e12", "loss.name=l2", "optim.total_kimg=0.32",
                            "optim.batch_size=16", "optim.nan_check_every=5"])
    with pytest.raises(DivergedError):
        run_experiment(cfg, tracker=T.Tracker("layout"))
    client = _client()
    exp = client.get_experiment_by_name("layout")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED" and run.data.tags[T.TAG_ERROR].startswith("DivergedError: loss became non-finite")


def test_missing_asset_fails_before_anything_is_created(store, tmp_path, monkeypatch):
    monkeypatch.setenv("SFD_HOME", str(tmp_path / "no-assets"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch"))
    cfg = load_config(ROOT / "experiments" / "cifar10_sfd.yaml")
    with pytest.raises(MissingAssetError, match="edm-cifar10-32x32-uncond-vp"):
        run_experiment(cfg)
    assert not store.exists()  # no tracking store, no experiment, no run


def test_default_metric_by_name_matches_the_teacher():
    from sfd.runner import default_metrics
    from sfd.teachers import get_teacher

    for name in ("digits", "gmm-8"):
        assert default_metrics(name) == [get_teacher(name).default_metric]


def test_second_stage_distils_a_logged_first_stage_run(store):
    """Spec §10 wiring on the GMM: a first stage with N = 7 (5 NFE + AFS), then 1 NFE from its MLflow run id;
    a teacher grid that is not the first stage's own is refused before a run is created."""
    from sfd.config import ConfigError

    first = run_experiment(load_config(GMM, TINY + ["student.nfe=5"]), tracker=T.Tracker("stages"))
    stage2 = TINY + ["algorithm=second-stage", f"second_stage.first_stage={first.run_id}", "solver.name=euler",
                     "student.nfe=1", "optim.lr=5e-4"]
    second = run_experiment(load_config(GMM, stage2 + ["solver.m=2"]), tracker=T.Tracker("stages"))
    run = _client().get_run(second.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["nfe"] == 1
    assert run.data.params["second_stage.first_stage"] == first.run_id and run.data.params["solver.m"] == "2"
    with pytest.raises(ConfigError, match="first stage's own grid"):
        run_experiment(load_config(GMM, stage2 + ["solver.m=3"]), tracker=T.Tracker("stages"))
    exp = _client().get_experiment_by_name("stages")
    assert len(_client().search_runs([exp.experiment_id])) == 2


def test_second_stage_starts_from_an_sfdv_run_at_a_trained_step_condition(store):
    """Spec §10: the second stage may start from "SFD-v with condition 7". Its first stage's main N is 4, so the
    step condition is asked for explicitly; one the SFD-v model was not trained on is refused before a run."""
    from sfd.config import ConfigError

    digits = ROOT / "experiments" / "digits_sfd.yaml"
    tiny = ["optim.batch_size=16", "optim.total_kimg=0.032", "eval.num_samples=16", "eval.gap_nfe=10"]
    first = run_experiment(load_config(digits, tiny + ["algorithm=sfd-v", "student.nfe=2",
                                                       "sfdv.num_steps_choices=[4,7]"]), tracker=T.Tracker("stages"))
    stage2 = tiny + ["algorithm=second-stage", f"second_stage.first_stage={first.run_id}", "solver.name=euler",
                     "student.nfe=1", "solver.m=2", "optim.lr=5e-4"]
    second = run_experiment(load_config(digits, stage2 + ["second_stage.first_stage_step=7"]),
                            tracker=T.Tracker("stages"))
    assert _client().get_run(second.run_id).info.status == "FINISHED"
    for step, message in ((5, r"trained on N in \[4, 7\]"), (None, "first stage's own grid")):
        with pytest.raises(ConfigError, match=message):
            run_experiment(load_config(digits, stage2 + [f"second_stage.first_stage_step={step or 'null'}"]),
                           tracker=T.Tracker("stages"))
    # a first stage of another teacher: its network, classes and metrics do not fit (it used to run, score
    # against the wrong teacher and save a student that could not be loaded again)
    with pytest.raises(ConfigError, match="saved student was distilled with teacher='digits', this run has "
                                          "teacher='digits-cond'"):
        run_experiment(load_config(digits, stage2 + ["second_stage.first_stage_step=7", "teacher.name=digits-cond",
                                                     "eval.metrics=[fd_digits]"]), tracker=T.Tracker("stages"))
    exp = _client().get_experiment_by_name("stages")
    assert len(_client().search_runs([exp.experiment_id])) == 2


def test_same_config_same_numbers(store):
    """A logged run is reproducible: the embedded digits teacher (student with dropout) twice, same metrics."""
    cfg = load_config(ROOT / "experiments" / "digits_sfd.yaml", ["optim.total_kimg=0.64", "eval.num_samples=200"])
    a = run_experiment(cfg, tracker=T.Tracker("repro"))
    b = run_experiment(cfg, tracker=T.Tracker("repro"))
    assert a.metrics["fd_digits"] == b.metrics["fd_digits"] and a.run_id != b.run_id


def test_speed_options_are_run_config_values(store):
    """The speed options in a run's config reach the distillation core and are logged. The channel-stats group
    norm changes the embedded digits run's metric only by rounding; channels-last draws the student's dropout
    masks in memory order, i.e. other masks, so that run differs as another seed would (not asserted equal)."""
    base = ["optim.total_kimg=0.64", "eval.num_samples=200"]
    digits = ROOT / "experiments" / "digits_sfd.yaml"
    plain = run_experiment(load_config(digits, base), tracker=T.Tracker("speed"))
    stats = run_experiment(load_config(digits, base + ["group_norm=channel-stats"]), tracker=T.Tracker("speed"))
    assert stats.metrics["fd_digits"] == pytest.approx(plain.metrics["fd_digits"], rel=1e-5)
    fast = run_experiment(load_config(digits, base + ["channels_last=true", "group_norm=channel-stats"]),
                          tracker=T.Tracker("speed"))
    params = _client().get_run(fast.run_id).data.params
    assert params["channels_last"] == "True" and params["group_norm"] == "channel-stats"
    assert math.isfinite(fast.metrics["fd_digits"])


def test_eval_compile_compiles_the_sampled_network_in_eval_mode_and_changes_no_number(store, monkeypatch):
    """`eval.compile` compiles the network evaluation samples with, and only that one (training stays eager
    with compile=false). torch.compile is replaced by a spy that returns the network itself, so the numbers
    must be the eager run's up to the rounding of another batch size: this also checks that the ragged last
    batch, filled with further seeds for the compiled network, keeps the right samples and classes."""
    digits = ROOT / "experiments" / "digits_cond_sfd.yaml"
    tiny = ["optim.batch_size=16", "optim.total_kimg=0.032", "eval.num_samples=10", "eval.batch_size=4"]
    eager = run_experiment(load_config(digits, tiny), tracker=T.Tracker("eval-compile"))
    compiled_modules = []

    def spy_compile(module, **kwargs):
        compiled_modules.append((module, module.training))
        return module
    monkeypatch.setattr(torch, "compile", spy_compile)
    compiled = run_experiment(load_config(digits, tiny + ["eval.compile=true"]), tracker=T.Tracker("eval-compile"))
    assert [training for _, training in compiled_modules] == [False]
    for key in ("fd_digits", "class_accuracy"):
        assert compiled.metrics[key] == pytest.approx(eager.metrics[key], rel=1e-6), key
    assert _client().get_run(compiled.run_id).data.params["eval.compile"] == "True"


def test_lpips_weights_checked_are_the_ones_each_loss_builds():
    """The main LPIPS loss takes loss.opts.net; the final-step loss is built without options (VGG)."""
    from sfd.runner import lpips_assets

    cfg = load_config(GMM, ["loss.name=lpips", "loss.opts.net=alex", "loss.final=lpips"])
    assert lpips_assets(cfg) == {"name": "lpips-alexnet", "final": "lpips-vgg16"}
    assert lpips_assets(load_config(GMM, ["loss.name=l1"])) == {}
