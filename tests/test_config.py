"""Run configs: typed YAML + overrides, clear errors before anything exists, exact round trip."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sfd.config import (
    ConfigError,
    RunConfig,
    all_keys,
    dump_yaml,
    flatten,
    from_dict,
    load_config,
    save_yaml,
    to_dict,
    to_settings,
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_experiment_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    again = load_config(save_yaml(cfg, tmp_path / "resolved.yaml"))
    assert again == cfg
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_paper_cifar10_settings():
    cfg = load_config(ROOT / "experiments" / "cifar10_sfd.yaml")
    assert (cfg.student.nfe, cfg.student.afs, cfg.student.t_min, cfg.student.t_max) == (2, True, 0.006, 80.0)
    assert (cfg.student.schedule, cfg.student.rho, cfg.solver.name, cfg.solver.m) == ("polynomial", 7.0, "dpmpp3m", 3)
    assert (cfg.loss.name, cfg.optim.lr, cfg.optim.total_kimg, cfg.optim.batch_size) == ("l1", 5e-5, 200, 128)
    assert cfg.eval.metrics == ["fid"] and cfg.eval.num_samples == 50_000
    assert load_config(ROOT / "experiments" / "imagenet64_sfd.yaml").optim.lr == 1e-5


@pytest.mark.parametrize("name", ["cifar10_sfd", "imagenet64_sfd"])
def test_paper_configs_run_the_measured_fast_setting_and_smoke_runs_do_not_compile(name):
    from sfd.runner import smoke_config

    cfg = load_config(ROOT / "experiments" / f"{name}.yaml")
    assert (cfg.precision, cfg.compile, cfg.channels_last, cfg.eval.compile) == ("bf16", True, True, False)
    smoke, notes = smoke_config(cfg)
    assert (smoke.precision, smoke.compile, smoke.channels_last) == ("bf16", False, True)
    assert "one-iteration wiring check" in notes["sfd.smoke.compile"]


def test_overrides_are_yaml_typed_and_dotted():
    cfg = load_config(None, ["student.nfe=3", "student.afs=false", "student.t_min=2e-3", "teacher.path=null",
                             "optim.betas=[0.8, 0.99]", "solver.opts.max_order=2", "eval.metrics=[teacher_gap]",
                             "teacher.name=gmm-8"])
    assert cfg.student.nfe == 3 and cfg.student.afs is False and cfg.student.t_min == 0.002
    assert cfg.teacher.path is None and cfg.optim.betas == [0.8, 0.99]
    assert cfg.solver.opts == {"max_order": 2} and cfg.eval.metrics == ["teacher_gap"]
    assert cfg.num_steps == 4  # NFE 3 without AFS: an Euler student needs N = NFE + 1 timestamps


def test_mapping_overrides_accept_nested_and_dotted_keys():
    a = load_config(None, {"student": {"nfe": 4}, "loss.name": "l2", "solver": {"opts": {"max_order": 2}}})
    b = load_config(None, ["student.nfe=4", "loss.name=l2", "solver.opts.max_order=2"])
    assert a == b


def test_flatten_has_every_schema_field():
    flat = flatten(to_dict(RunConfig()))
    assert set(all_keys()) <= set(flat)
    for key in ("teacher.name", "student.nfe", "student.afs", "student.t_min", "student.schedule", "solver.name",
                "solver.m", "loss.name", "algorithm", "optim.lr", "optim.total_kimg", "optim.batch_size",
                "eval.num_samples", "precision", "device", "seed"):
        assert key in flat


@pytest.mark.parametrize("overrides,names", [
    (["studnet.nfe=2"], ["unknown config key 'studnet.nfe'", "student.nfe"]),
    (["optim.learning_rate=1"], ["optim.learning_rate", "optim.lr"]),
    (["lr=1e-4"], ["'lr'", "optim.lr"]),
    (["student.nfe=0"], ["student.nfe", "got 0", "1..1000"]),
    # upper bounds: what could not finish or fit is refused before anything is built (issue 18)
    (["student.nfe=1000000000"], ["student.nfe", "got 1000000000", "1..1000"]),
    (["solver.m=100000000"], ["solver.m", "got 100000000", "0..100"]),
    (["eval.num_samples=1000000000000"], ["eval.num_samples", "1..1,000,000"]),
    (["optim.total_kimg=1e12"], ["optim.total_kimg", "1000000000000.0", "at most 200,000 "]),
    (["optim.batch_size=1000000000"], ["optim.batch_size", "at most 65,536"]),
    (["eval.batch_size=1000000000"], ["eval.batch_size", "at most 65,536"]),
    (["eval.gap_nfe=1000000000"], ["eval.gap_nfe", "at most 1,000"]),
    (["ddp=100000", "device=cpu"], ["ddp", "at most 256"]),
    (["algorithm=sfd-v", "sfdv.num_steps_choices=[4, 5, 1000000]"], ["sfdv.num_steps_choices[2]", "at most 1002"]),
    ([f"name={'x' * 300}"], ["name", "300 characters", "1 to 200"]),
    ([f"teacher.path={'x' * 5000}"], ["teacher.path", "5,000 characters", "at most 4,096"]),
    ([f"optim.betas=[{', '.join(['0.5'] * 2000)}]"], ["optim.betas", "2,000 items", "at most 1,000"]),
    (["eval.metrics=" + "x" * 3000], ["eval.metrics", "x... (3,002 characters)", "expected a list"]),
    (["student.nfe=two"], ["student.nfe", "'two'", "integer"]),
    (["student.afs=maybe"], ["student.afs", "'maybe'", "true/false"]),
    (["student.t_min=80"], ["t_min=80.0", "t_max=80.0", "0 < t_min < t_max"]),
    (["student.t_min=-1"], ["student.t_min", "-1"]),
    (["solver.name=dpmpp"], ["solver.name", "'dpmpp'", "dpmpp3m", "euler"]),
    (["loss.name=huber"], ["loss.name", "'huber'", "pseudo_huber"]),
    (["student.schedule=cosine"], ["student.schedule", "'cosine'", "polynomial"]),
    (["teacher.name=cifar10"], ["teacher.name", "'cifar10'", "cifar10-uncond"]),
    (["algorithm=distill"], ["algorithm", "'distill'", "sfd-v", "second-stage", "baseline"]),
    (["precision=fp16"], ["precision", "'fp16'", "bf16"]),
    (["device=gpu"], ["device", "'gpu'", "cuda"]),
    (["compile=true", "compile_mode=fast"], ["compile_mode", "'fast'", "reduce-overhead"]),
    (["compile_mode=reduce-overhead"], ["compile_mode", "compile=false", "compile=true"]),
    (["group_norm=fused"], ["group_norm", "'fused'", "channel-stats"]),
    (["channels_last=yes please"], ["channels_last", "true/false"]),
    (["eval.metrics=[fid, is]"], ["eval.metrics[1]", "'is'", "teacher_gap"]),
    (["optim.batch_size=0"], ["optim.batch_size", "0"]),
    (["solver.m=-1"], ["solver.m", "-1"]),
    (["algorithm=sfd-v", "sfdv.num_steps_choices=[2, 4]"], ["sfdv.num_steps_choices[0]", "N=2", "AFS"]),
    (["algorithm=sfd-v", "student.nfe=9"], ["student.nfe", "9", "[4, 5, 6, 7]"]),
    (["algorithm=second-stage"], ["second_stage.first_stage", "null"]),
    (["algorithm=second-stage", "second_stage.first_stage=abc"], ["solver.name", "euler"]),
    (["algorithm=baseline", "solver.name=heun", "student.nfe=3", "student.afs=false"], ["student.nfe", "heun"]),
    (["algorithm=vanilla", "teacher.name=imagenet64-cond"], ["vanilla.data", "imagenet64-cond", "teacher"]),
    (["vanilla.data=images"], ["vanilla.data", "'images'", "dataset"]),
    (["seed=18446744073709551616"], ["seed", "18446744073709551616", "[0, 2**63)"]),
    (["student.rho=1e-9"], ["grid overflows", "rho=1e-09"]),
    (["second_stage.first_stage=abc"], ["second_stage.first_stage", "only algorithm=second-stage", "algorithm=sfd"]),
    (["vanilla.data=teacher"], ["vanilla.data", "only algorithm=vanilla"]),
    (["algorithm=vanilla", "sfdv.num_steps_choices=[4, 5]"], ["sfdv.num_steps_choices", "only algorithm=sfd-v"]),
    (["algorithm=sfd-v", "sfdv.num_steps_choices=[4, 4, 5]"], ["sfdv.num_steps_choices", "each N once"]),
    (["algorithm=baseline", "solver.name=heun", "student.nfe=4", "student.afs=false", "loss.final=l2"],
     ["loss.final", "baseline"]),
    (["algorithm=baseline", "solver.name=heun", "student.nfe=4", "student.afs=false", "solver.afs=true"],
     ["solver.afs", "student.afs"]),
    (["student"], ["override 'student'", "key=value"]),
    (["student=3"], ["student is a section"]),
])
def test_bad_values_name_the_field_the_value_and_what_is_allowed(overrides, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for text in names:
        assert text in str(err.value), str(err.value)


def test_sfdv_and_second_stage_defaults():
    cfg = RunConfig()
    assert cfg.sfdv.num_steps_choices == [4, 5, 6, 7]  # NFE 2-5 with AFS (spec §9)
    stage2 = load_config(None, ["algorithm=second-stage", "second_stage.first_stage=some-run-id", "solver.name=euler",
                                "solver.m=2", "student.nfe=1", "optim.lr=5e-4", "loss.final=lpips"])
    assert stage2.num_steps == 3  # N = 3 with AFS: 1 NFE (spec §10)
    s = to_settings(stage2)
    assert (s.teacher_solver, s.m, s.final_loss, s.lr, s.grid.num_steps) == ("euler", 2, "lpips", 5e-4, 3)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_every_precision_is_a_run_config_value(precision):
    assert to_settings(load_config(None, ["teacher.name=gmm-8", f"precision={precision}"])).precision == precision


def test_to_settings_maps_every_training_field():
    cfg = load_config(None, ["teacher.name=gmm-8", "student.nfe=3", "student.t_min=0.002", "student.schedule=logsnr",
                             "solver.name=heun", "solver.m=2", "loss.name=pseudo_huber", "optim.lr=1e-3",
                             "optim.total_kimg=1.0", "optim.batch_size=16", "seed=7", "precision=bf16",
                             "compile=true", "compile_mode=reduce-overhead", "channels_last=true",
                             "group_norm=channel-stats"])
    s = to_settings(cfg, num_classes=10)
    speed = (s.compile, s.compile_mode, s.channels_last, s.group_norm)
    assert speed == (True, "reduce-overhead", True, "channel-stats")
    assert s.algorithm == "sfd" and s.grid.num_steps == 5 and s.grid.afs and s.grid.t_min == 0.002
    assert s.grid.schedule == "logsnr" and s.teacher_solver == "heun" and s.m == 2 and s.loss == "pseudo_huber"
    assert (s.lr, s.total_kimg, s.batch_size, s.seed, s.precision, s.num_classes) == (1e-3, 1.0, 16, 7, "bf16", 10)
    assert s.total_iterations == 63 and s.num_steps_choices is None and not s.teacher_afs
    v = to_settings(load_config(None, ["algorithm=sfd-v"]))
    assert v.algorithm == "sfd" and v.num_steps_choices == (4, 5, 6, 7)
    free = to_settings(load_config(None, ["algorithm=vanilla", "vanilla.data=teacher"]))
    assert free.algorithm == "vanilla" and free.vanilla_data_free
    with pytest.raises(ConfigError, match="does not train"):
        to_settings(load_config(None, ["algorithm=baseline", "student.afs=false"]))


def test_missing_file_and_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


@pytest.mark.parametrize("text", ["", " \n\n", "# settings to come\n"])
def test_empty_config_file_is_refused_not_taken_as_all_defaults(tmp_path, text):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    with pytest.raises(ConfigError, match="is empty \\(no settings\\)"):
        load_config(empty)


def test_a_folder_is_not_a_config_file(tmp_path, capsys):
    import importlib.util

    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)
    spec = importlib.util.spec_from_file_location("experiments_run", ROOT / "experiments" / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"error: config file '{tmp_path}' is a folder, not a YAML file; name a " \
                                      "config file, e.g. experiments/digits_sfd.yaml\n"


def test_cli_bad_field_fails_clearly_and_creates_nothing(tmp_path):
    """experiments/run.py with a typo in the YAML: exit 2, one-line error naming the key, no store created."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((ROOT / "experiments" / "gmm_sfd.yaml").read_text().replace("loss: {name: l1}",
                                                                                "loss: {nmae: l1}"))
    runs = tmp_path / "runs"
    env = {**os.environ, "SFD_RUNS_DIR": str(runs)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), str(cfg)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "unknown config key 'loss.nmae'" in proc.stderr and "loss.name" in proc.stderr
    assert not runs.exists()
    dry = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"),
                          str(ROOT / "experiments" / "gmm_sfd.yaml"), "student.nfe=3", "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert from_dict(yaml.safe_load(dry.stdout)).student.nfe == 3
    assert not runs.exists()
    other = tmp_path / "other" / "mlflow.db"  # --dry-run looks a first stage up in the store it is given
    stage2 = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"),
                             str(ROOT / "experiments" / "gmm_sfd.yaml"), "algorithm=second-stage",
                             "second_stage.first_stage=abc123", "solver.name=euler", "solver.m=2", "student.nfe=1",
                             "--dry-run", "--tracking-uri", f"sqlite:///{other}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert stage2.returncode == 2 and f"no tracking store at {other}" in stage2.stderr, stage2.stderr
    assert not runs.exists() and not other.parent.exists()


@pytest.mark.parametrize("overrides,names", [
    (["solver.opts.thresholdin=false"], ["solver.opts.thresholdin", "dpmpp3m", "max_order", "mean thresholding"]),
    (["solver.opts.thresholding=1"], ["solver.opts.thresholding", "got 1", "true/false"]),
    (["solver.opts.max_order=2.5"], ["solver.opts.max_order", "2.5", "integer"]),
    (["solver.opts.threshold_max=.inf"], ["solver.opts.threshold_max", "inf", "finite"]),
    (["solver.opts.afs=true"], ["solver.opts.afs", "solver.afs"]),
    (["solver.name=heun", "solver.opts.max_order=2"], ["solver.opts", "max_order", "'heun' takes no options"]),
    (["solver.name=ipndm", "solver.opts.max_order=5"], ["solver.opts", "max_order", "1..4"]),  # the solver's own check
    (["loss.name=pseudo_huber", "loss.opts.c=abc"], ["loss.opts.c", "'abc'", "a number"]),
    (["loss.name=pseudo_huber", "loss.opts.cc=1"], ["loss.opts.cc", "pseudo_huber", "did you mean c"]),
    (["loss.name=l1", "loss.opts.c=1"], ["loss.opts", "'c'", "'l1' takes no options"]),
    (["loss.name=lpips", "loss.opts.net=squeeze"], ["loss.opts.net", "'squeeze'", "vgg, alex"]),
])
def test_solver_and_loss_options_are_checked_against_what_they_accept(overrides, names):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "experiments" / "digits_sfd.yaml", overrides)
    for text in names:
        assert text in str(err.value), str(err.value)


def test_options_reach_the_run_converted_and_usable():
    from sfd.losses import get_loss

    cfg = load_config(None, ["loss.name=pseudo_huber", "loss.opts.c=5e-5", "solver.opts.threshold_max=2",
                             "solver.opts.thresholding=false"])
    assert cfg.loss.opts == {"c": 5e-5} and cfg.solver.opts == {"threshold_max": 2.0, "thresholding": False}
    assert to_settings(cfg).loss_opts == {"c": 5e-5}  # YAML 1.1 read 5e-5 as a string; the loss gets a number
    pred, target = torch.zeros(2, 3), torch.ones(2, 3)
    assert get_loss(cfg.loss.name, **cfg.loss.opts)(pred, target).item() > 0


@pytest.mark.parametrize("teacher,kind", [("digits", "embedded"), ("digits-cond", "embedded"), ("gmm-8", "analytic")])
def test_teacher_path_is_refused_for_teachers_that_load_no_file(teacher, kind):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"teacher.name={teacher}", "teacher.path=/etc/hostname"])
    assert f"teacher {teacher!r} is {kind}" in str(err.value) and "teacher.path does not apply" in str(err.value)


def test_teacher_path_that_is_not_an_edm_pickle_fails_before_the_run(tmp_path):
    """prepare() is what runs before MLflow is touched; only the file's first bytes are read."""
    import pickle

    from sfd.runner import prepare

    text, archive, good = tmp_path / "hostname", tmp_path / "net.pt", tmp_path / "net.pkl"
    text.write_text("myhost\n")
    torch.save({"w": torch.zeros(1)}, archive)
    for path, reason in ((text, "is not an EDM network pickle"), (archive, "is a zip archive")):
        cfg = load_config(ROOT / "experiments" / "cifar10_sfd.yaml",
                          [f"teacher.path={path}", "eval.metrics=[teacher_gap]"])
        with pytest.raises(ConfigError) as err:
            prepare(cfg)
        assert "teacher.path" in str(err.value) and str(path) in str(err.value) and reason in str(err.value)
    for protocol in (0, 2, pickle.DEFAULT_PROTOCOL):  # a pickled dict, as EDM writes, passes the cheap check
        good.write_bytes(pickle.dumps({"ema": None}, protocol=protocol))
        prepare(load_config(ROOT / "experiments" / "cifar10_sfd.yaml",
                            [f"teacher.path={good}", "eval.metrics=[teacher_gap]"]))


@pytest.mark.parametrize("teacher,metric,reason", [
    ("digits", "class_accuracy", "needs a class-conditional teacher; 'digits' is unconditional"),
    ("gmm-8", "fd_digits", "defined for the embedded digits teachers only, not 'gmm-8'"),
    ("gmm-img-4", "pixel_fd", "defined for the embedded digits teachers only, not 'gmm-img-4'"),
    ("cifar10-uncond", "class_accuracy", "defined for the embedded digits teachers only, not 'cifar10-uncond'"),
])
def test_a_metric_that_cannot_score_the_teachers_samples_is_refused(teacher, metric, reason):
    """Such a metric used to pass every check and fail in evaluate(), after training; the teacher's facts come
    from its spec, so nothing is loaded to refuse it."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"teacher.name={teacher}", f"eval.metrics=[teacher_gap, {metric}]"])
    assert str(err.value).startswith(f"eval.metrics[1]: ") and reason in str(err.value), str(err.value)


@pytest.mark.parametrize("teacher,metrics", [
    ("digits", "[fd_digits, pixel_fd, teacher_gap]"),
    ("digits-cond", "[fd_digits, pixel_fd, class_accuracy, teacher_gap]"),
    ("gmm-8", "[teacher_gap]"),
    ("cifar10-uncond", "[fid, teacher_gap]"),
])
def test_metrics_that_fit_the_teacher_pass(teacher, metrics):
    assert load_config(None, [f"teacher.name={teacher}", f"eval.metrics={metrics}"]).eval.metrics


def test_an_unfit_metric_stops_a_run_before_its_store_exists(tmp_path):
    from sfd.runner import run_experiment
    from sfd.tracking import Tracker

    cfg = from_dict({"teacher": {"name": "digits"}, "eval": {"metrics": ["class_accuracy"]}})  # not yet validated
    store = tmp_path / "runs" / "mlflow.db"
    with pytest.raises(ConfigError, match=r"eval.metrics\[0\]: class_accuracy needs a class-conditional teacher"):
        run_experiment(cfg, tracker=Tracker("unfit", tracking_uri=f"sqlite:///{store}"))
    assert not store.parent.exists()
