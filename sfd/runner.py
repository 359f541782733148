"""One run, start to end: check assets → (MLflow run) → teacher → student → distil → evaluate → log.

    result = run_experiment(load_config("experiments/digits_sfd.yaml"))

Everything that can fail on bad input (config, missing checkpoints / data / metric weights, a first-stage
model that is not there) fails before the MLflow run exists. Once it exists, any error ends it FAILED with
the reason (`sfd.error`) and propagates; a diverging loss raises `sfd.distill.DivergedError`.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sfd import config as C
from sfd.config import ConfigError, RunConfig
from sfd.reference_runs import (
    check_reference_run, load_reference, load_reference_first_stage, reference_first_stage_info,
)
from sfd.teachers.reference import is_reference_snapshot

# Metrics a smoke run computes instead of ones that need large assets (and mean nothing on a random net).
SMOKE_METRIC_SUBSTITUTES = {"fid": "teacher_gap"}
SMOKE_OBJECTIVE_SUBSTITUTES = {"fid": "teacher_gap_mean"}
# A 56M-parameter SongUNet costs ~1-2 s per forward at batch 2 on a 2-core CPU: a smoke row is one iteration
# of batch 2 against a one-step-per-student-step teacher (M = 0), and two evaluation samples.
SMOKE_ITERATIONS = 1
SMOKE_BATCH = 2
SMOKE_M = 0
SMOKE_SAMPLES = 2
SMOKE_GAP_NFE = 1
SMALL_TEACHER_PREFIXES = ("digits", "gmm")  # teachers small enough to keep their student weights in smoke runs
# `second_stage.first_stage: row:<id>` names another row of the same study; studies/run.py resolves it to that
# row's finished run id before the run starts (a lone run cannot).
ROW_REF_PREFIX = "row:"
TAG_FIRST_STAGE = "sfd.first_stage"


@dataclass
class RunResult:
    run_id: str | None
    status: str  # FINISHED | FAILED
    metrics: dict[str, float]
    config: RunConfig
    objective: list[float] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)


# ----- preparation (nothing is created here) ----------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: got {name!r}, but no CUDA device is available here; use device=cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: got {name!r}, but MPS is not available here; use device=cpu or auto")
    return device


def _is_small_teacher(name: str) -> bool:
    return name.startswith(SMALL_TEACHER_PREFIXES)


def default_metrics(teacher_name: str) -> list[str]:
    """The metrics a run reports when eval.metrics is null: the teacher's default metric."""
    from sfd.teachers.registry import default_metric

    return [default_metric(teacher_name)]


def _asset_present(name: str) -> bool:
    from sfd.assets import asset_path

    return asset_path(name) is not None


def smoke_config(cfg: RunConfig) -> tuple[RunConfig, dict[str, str]]:
    """The same run at a wiring-test budget: a random teacher of the right architecture, one iteration of
    batch 2 with M = 0, two evaluation samples, FID replaced by the teacher gap against a 1-NFE reference.
    Returns the config and notes (tagged on the run) saying what was substituted."""
    notes: dict[str, str] = {}
    metrics = cfg.eval.metrics or default_metrics(cfg.teacher.name)
    new_metrics = []
    for m in metrics:
        sub = SMOKE_METRIC_SUBSTITUTES.get(m, m)
        if sub != m:
            notes[f"sfd.smoke.metric.{m}"] = (f"{sub} on {SMOKE_SAMPLES} samples against a {SMOKE_GAP_NFE}-NFE "
                                              "reference (FID needs Inception weights and 50k samples, and "
                                              "means nothing on a random teacher)")
        if sub not in new_metrics:
            new_metrics.append(sub)
    batch = min(cfg.optim.batch_size, SMOKE_BATCH)
    updates: dict[str, Any] = {
        "smoke": True,
        "optim.batch_size": batch,
        "optim.total_kimg": SMOKE_ITERATIONS * batch / 1000,
        "optim.nan_check_every": 1,
        # the second stage's Euler teacher walks its first stage's own grid, so its M is not a budget knob
        "solver.m": cfg.solver.m if cfg.algorithm == "second-stage" else min(cfg.solver.m, SMOKE_M),
        "eval.metrics": new_metrics,
        "eval.num_samples": SMOKE_SAMPLES,
        "eval.batch_size": SMOKE_SAMPLES,
        "eval.gap_nfe": SMOKE_GAP_NFE,
        "log.every": SMOKE_ITERATIONS,
    }
    if cfg.compile or cfg.eval.compile:  # compiling would take longer than the one iteration it speeds up
        updates.update({"compile": False, "compile_mode": None, "eval.compile": False})
        notes["sfd.smoke.compile"] = "off (a one-iteration wiring check would spend its time compiling)"
    if cfg.algorithm == "sfd-v":  # evaluate at every trained N: keep it to two (the main one and another)
        updates["sfdv.num_steps_choices"] = sorted({cfg.num_steps, max(cfg.sfdv.num_steps_choices)})
    for key, asset in lpips_assets(cfg).items():
        if not _asset_present(asset):
            updates[f"loss.{key}"] = "l2"
            notes[f"sfd.smoke.loss.{key}"] = f"l2 instead of lpips ({asset} weights are not installed)"
    if not _is_small_teacher(cfg.teacher.name):
        notes["sfd.smoke.student_weights"] = "not saved (a random network of this size is not worth storing)"
    notes["sfd.smoke.budget"] = (f"{SMOKE_ITERATIONS} iteration(s) of batch {batch}, solver.m="
                                 f"{updates['solver.m']}, {SMOKE_SAMPLES} evaluation samples")
    smoke = C.replace(cfg, updates)
    return smoke, notes


def lpips_assets(cfg: RunConfig) -> dict[str, str]:
    """The LPIPS weights asset of each LPIPS loss in the run, by loss key: `name` takes `loss.opts.net`; the
    `final`-step loss is built without options (sfd.distill), so it is VGG's."""
    from sfd.losses import LPIPS_NETS

    assets = {}
    if cfg.loss.name == "lpips":
        assets["name"] = LPIPS_NETS[cfg.loss.opts.get("net", "vgg")]
    if cfg.loss.final == "lpips":
        assets["final"] = LPIPS_NETS["vgg"]
    return assets


def check_assets(cfg: RunConfig, tracking_uri: str | None = None, first_stage_info: dict | None = None) -> None:
    """Raise MissingAssetError / ConfigError for anything the run will need but cannot find — before any
    run or file is created. A second stage's first-stage model is located (downloaded once from its run)
    and its grid checked against the Euler teacher grid; `first_stage_info` (a sampling.json-like dict with
    the `grid`) stands in for a first stage that does not exist yet (a study row run earlier in the study)."""
    from sfd.assets import require
    from sfd.teachers import check_teacher_assets

    needs_data = cfg.algorithm == "vanilla" and cfg.vanilla.data == "dataset"
    if not cfg.smoke:
        check_teacher_assets(cfg.teacher.name, cfg.teacher.path, needs_data=needs_data)
        metrics = cfg.eval.metrics or default_metrics(cfg.teacher.name)
        if "fid" in metrics:
            from sfd.teachers.registry import FID_REFS, teacher_dataset

            dataset = teacher_dataset(cfg.teacher.name)
            if dataset not in FID_REFS:
                raise ConfigError(f"eval.metrics: fid has no reference statistics for teacher {cfg.teacher.name!r}")
            check_fid_files(require("inception-2015-12-05"), require(FID_REFS[dataset]))
        for asset in lpips_assets(cfg).values():
            require(asset)
    if cfg.algorithm == "reference":
        check_reference_run(cfg)  # reads the snapshot: its teacher and grid must be this run's
    if cfg.algorithm == "second-stage":
        if first_stage_info is None and is_reference_snapshot(cfg.second_stage.first_stage):
            first_stage_info = reference_first_stage_info(cfg)
        if first_stage_info is None:
            folder = locate_first_stage(cfg.second_stage.first_stage, tracking_uri)
            first_stage_info = json.loads((folder / SAMPLING_FILE).read_text())
            if not first_stage_info.get("smoke"):  # its network is rebuilt from its own teacher's checkpoint
                check_teacher_assets(first_stage_info["teacher"], first_stage_info.get("teacher_path"))
        check_first_stage(cfg, first_stage_info)


_CHECKED_FID_FILES: set[tuple] = set()


def check_fid_files(inception_weights: Path, reference_stats: Path) -> None:
    """The Inception weights load and the reference statistics are finite 2048-d ones, or a ConfigError
    naming the file, before a run trains. Each file version is read once per process (a study's rows share
    them)."""
    from sfd.assets import file_version
    from sfd.metrics.fd import check_reference_stats
    from sfd.metrics.inception import FEATURE_DIM, check_inception_weights

    for path, check in ((Path(inception_weights), check_inception_weights),
                        (Path(reference_stats), lambda p: check_reference_stats(p, FEATURE_DIM))):
        version = file_version(path)
        if version not in _CHECKED_FID_FILES:
            try:
                check(path)
            except ValueError as exc:
                raise ConfigError(f"eval.metrics: fid: {exc}") from None
            _CHECKED_FID_FILES.add(version)


def resolve_eval(cfg: RunConfig) -> RunConfig:
    """Fill eval.metrics / eval.num_samples left null with their defaults, so the logged YAML replays exactly
    this run."""
    if cfg.eval.metrics is not None and cfg.eval.num_samples is not None:
        return cfg
    from sfd.metrics.evaluate import default_num_samples

    metrics = cfg.eval.metrics or default_metrics(cfg.teacher.name)
    num = cfg.eval.num_samples or default_num_samples(None, metrics)
    return C.replace(cfg, {"eval.metrics": metrics, "eval.num_samples": num})


def computed_metrics(cfg: RunConfig) -> set[str]:
    """The final metric names a run of this (resolved) config logs."""
    names = {"nfe", "train/wall_s", "train/device_hours", "eval/wall_s", "total/wall_s"}
    for m in cfg.eval.metrics or default_metrics(cfg.teacher.name):
        names |= {"teacher_gap_mean", "teacher_gap_std"} if m == "teacher_gap" else {m}
    return names


def prepare(cfg: RunConfig, *, smoke: bool = False, tracking_uri: str | None = None,
            first_stage_info: dict | None = None) -> tuple[RunConfig, dict[str, str]]:
    """Validate, apply the smoke budget when asked, resolve evaluation defaults, check assets (see
    `check_assets` for `first_stage_info`). Creates nothing."""
    C.validate(cfg)
    notes: dict[str, str] = {}
    if smoke and not cfg.smoke:
        cfg, notes = smoke_config(cfg)
    cfg = resolve_eval(cfg)
    check_assets(cfg, tracking_uri, first_stage_info)
    return cfg, notes


# ----- first-stage models (second stage) --------------------------------------------------------------

STUDENT_FILE = "student.safetensors"
SAMPLING_FILE = "sampling.json"


_FIRST_STAGE_DOWNLOADS: dict[tuple[str, str], Path] = {}


def locate_first_stage(ref: str, tracking_uri: str | None = None) -> Path:
    """The folder holding a first-stage student's `student.safetensors` + `sampling.json`: `ref` is such a
    folder, the .safetensors file, or an MLflow run id (its `student/` artifacts are downloaded, once per
    process)."""
    if ref.startswith(ROW_REF_PREFIX):
        raise ConfigError(f"second_stage.first_stage: got {ref!r}, a row of a study; only studies/run.py resolves "
                          "it (to that row's finished run id); give a run id or a student/ folder here")
    path = Path(ref).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        path = path.parent
    if path.is_dir():
        for name in (STUDENT_FILE, SAMPLING_FILE):
            if not (path / name).is_file():
                raise ConfigError(f"second_stage.first_stage: {ref!r} has no {name}; point it at the student/ "
                                  "folder a first-stage run logged, or give that run's MLflow id")
        return path
    from sfd.tracking import default_tracking_uri, get_client, sqlite_path

    uri = tracking_uri or default_tracking_uri()
    if (uri, ref) in _FIRST_STAGE_DOWNLOADS:
        return _FIRST_STAGE_DOWNLOADS[uri, ref]
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # do not create an empty store just to look a run up
        raise ConfigError(f"second_stage.first_stage: got {ref!r}; neither a folder / .safetensors file nor a "
                          f"run id (there is no tracking store at {db})")
    client = get_client(uri)
    try:
        client.get_run(ref)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types for unknown ids
        raise ConfigError(f"second_stage.first_stage: got {ref!r}; neither a folder / .safetensors file nor a "
                          f"run id in the tracking store {client.tracking_uri}") from None
    dst = Path(tempfile.mkdtemp(prefix="sfd-first-stage-"))
    try:
        folder = Path(client.download_artifacts(ref, "student", str(dst)))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"second_stage.first_stage: run {ref} has no student/ artifacts ({exc})") from None
    _FIRST_STAGE_DOWNLOADS[uri, ref] = locate_first_stage(str(folder))
    return _FIRST_STAGE_DOWNLOADS[uri, ref]


def first_stage_num_steps(cfg: RunConfig, info: dict) -> int:
    """The first-stage N the second stage distils: an SFD model's own N, or for SFD-v the step condition
    `second_stage.first_stage_step` (default: its main N), which must be one of the N it was trained on."""
    own = info["grid"]["num_steps"]
    asked = cfg.second_stage.first_stage_step
    if not info.get("step_condition"):
        if asked is not None:
            raise ConfigError(f"second_stage.first_stage_step: got {asked}; the first stage is a plain SFD model "
                              f"(N={own}) without a step condition, so leave it null")
        return own
    trained = info.get("num_steps_choices") or [own]
    n = own if asked is None else asked
    if n not in trained:
        raise ConfigError(f"second_stage.first_stage_step: got {n}; the SFD-v first stage was trained on N in "
                          f"{trained}")
    return n


def check_first_stage(cfg: RunConfig, info: dict) -> int:
    """The second stage's Euler teacher grid ((M+1)(N-1)+1 points) must be the first stage's own grid at the N
    it distils (see `first_stage_num_steps`); returns that N."""
    for key, ours in (("teacher", cfg.teacher.name), ("smoke", cfg.smoke)):
        theirs = info.get(key, False if key == "smoke" else None)
        if theirs != ours:  # its network, shapes, classes and metrics are another teacher's
            raise ConfigError(f"second stage: the first stage was distilled with {key}={theirs!r}, this run has "
                              f"{key}={ours!r}; a second stage continues its first stage's teacher, so set "
                              f"{'teacher.name' if key == 'teacher' else 'the same smoke mode'} to match")
    g = info["grid"]
    n = first_stage_num_steps(cfg, info)
    expected = (cfg.solver.m + 1) * (cfg.num_steps - 1) + 1
    mismatch = {k: (g[k], getattr(cfg.student, k)) for k in ("schedule", "t_min", "t_max", "rho")
                if g[k] != getattr(cfg.student, k)}
    if n != expected or mismatch:
        hint = ""  # a step-conditioned first stage samples at any N it was trained on
        if n != expected and info.get("step_condition") and expected in (info.get("num_steps_choices") or []):
            hint = f"; the first stage is SFD-v: set second_stage.first_stage_step={expected}"
        raise ConfigError(f"second stage: the Euler teacher grid ((solver.m+1)(N-1)+1 = {expected} points) must be "
                          f"the first stage's own grid (N={n}, {g['schedule']}, t_min={g['t_min']}, "
                          f"t_max={g['t_max']}, rho={g['rho']}); differs: {mismatch or 'N'}{hint}")
    return n


def load_first_stage(folder: Path, device) -> tuple[torch.nn.Module, dict]:
    """The first-stage student network (eval mode, frozen) and its sampling settings."""
    from safetensors.torch import load_file

    from sfd.teachers import get_teacher

    info = json.loads((folder / SAMPLING_FILE).read_text())
    base = get_teacher(info["teacher"], path=info.get("teacher_path"), device=device, smoke=info.get("smoke", False))
    net = base.make_student(step_condition=info.get("step_condition", False))
    net.load_state_dict(load_file(str(folder / STUDENT_FILE), device=str(device)))
    return net.eval().requires_grad_(False), info


# ----- the run -----------------------------------------------------------------------------------------

_TEACHER_CACHE: dict[tuple, Any] = {}


def load_teacher(cfg: RunConfig, device):
    """`sfd.teachers.get_teacher`, keeping the last teacher: a study's trials share it (it is frozen and never
    trained), so a checkpoint is read once per study, not once per trial."""
    from sfd.teachers import get_teacher
    from sfd.teachers.edm_pickle import EDMPickleError

    key = (cfg.teacher.name, cfg.teacher.path, str(device), cfg.smoke)
    if key not in _TEACHER_CACHE:
        _TEACHER_CACHE.clear()
        try:
            _TEACHER_CACHE[key] = get_teacher(cfg.teacher.name, path=cfg.teacher.path, device=device,
                                              smoke=cfg.smoke)
        except EDMPickleError as exc:  # a checkpoint that is not this teacher's: bad input, not a failed run
            where = "teacher.path" if cfg.teacher.path else f"teacher {cfg.teacher.name}"
            raise ConfigError(f"{where}: {exc}") from None
    return _TEACHER_CACHE[key]


def check_teacher_checkpoint(cfg: RunConfig, device: str | None = None) -> None:
    """Read a checkpoint teacher now (a ConfigError if it is not the named teacher's network, or is damaged):
    `prepare` only reads its first bytes. The teacher is kept on `device` (default: the run's), so a run that
    follows in this process on that device does not read it again."""
    from sfd.teachers.registry import teacher_source

    if not cfg.smoke and teacher_source(cfg.teacher.name) == "checkpoint":
        load_teacher(cfg, resolve_device(device or cfg.device))


def objective_key(name: str, smoke: bool) -> str:
    """The metric a run logs for objective `name` (a smoke run's teacher gap stands in for FID)."""
    return SMOKE_OBJECTIVE_SUBSTITUTES.get(name, name) if smoke else name


def objective_values(metrics: dict[str, float], names: list[str], smoke: bool) -> list[float]:
    return [metrics[objective_key(name, smoke)] for name in names]


def _loss_curve(history: dict[str, list[tuple[int, float]]]):
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    keys = sorted(k for k in history if k.startswith("loss/step_")) or (["loss"] if "loss" in history else [])
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    for key in keys:
        steps, values = zip(*history[key])
        ax.plot(steps, values, label=key.removeprefix("loss/").replace("_", " "), lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    if keys and all(v > 0 for k in keys for _, v in history[k]):
        ax.set_yscale("log")
    if len(keys) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def sampling_info(cfg: RunConfig, num_classes: int, step_condition: bool) -> dict:
    """What a saved student needs to be sampled and continued (`sampling.json`); studies/run.py builds the
    same dict for a row that has not run yet, to check a second stage chained to it."""
    grid = dataclasses.asdict(C.grid_spec(cfg))
    return {
        "algorithm": cfg.algorithm, "teacher": cfg.teacher.name, "teacher_path": cfg.teacher.path,
        "smoke": cfg.smoke, "solver": "euler", "nfe": cfg.student.nfe, "grid": grid,
        "step_condition": step_condition, "step": cfg.num_steps if step_condition else None,
        "num_steps_choices": cfg.sfdv.num_steps_choices if cfg.algorithm == "sfd-v" else None,
        "guidance": cfg.student.guidance, "num_classes": num_classes,
        "first_stage": cfg.second_stage.first_stage if cfg.algorithm == "second-stage" else None,
    }


def _save_student(run, student: torch.nn.Module, info: dict) -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(Path(tmp) / STUDENT_FILE))
        (Path(tmp) / SAMPLING_FILE).write_text(json.dumps(info, indent=2))
        run.log_artifact(Path(tmp) / STUDENT_FILE, "student")
        run.log_artifact(Path(tmp) / SAMPLING_FILE, "student")


def _distill_setup(cfg: RunConfig, teacher, device, tracking_uri: str | None = None):
    """(teacher network, student, settings, step condition) for a training algorithm."""
    from sfd.distill import make_student

    settings = C.to_settings(cfg, num_classes=teacher.num_classes)
    if cfg.algorithm == "sfd-v":
        return teacher.net, teacher.make_student(step_condition=True, step_init=cfg.sfdv.step_init), settings, True
    if cfg.algorithm != "second-stage":
        return teacher.net, teacher.make_student(), settings, False
    if is_reference_snapshot(cfg.second_stage.first_stage):
        first_net, info = load_reference_first_stage(cfg, device)
    else:
        first_net, info = load_first_stage(locate_first_stage(cfg.second_stage.first_stage, tracking_uri), device)
    first_n = check_first_stage(cfg, info)
    g = info["grid"]
    step_cond = bool(info.get("step_condition"))
    teacher_step = first_n if step_cond else None
    settings = dataclasses.replace(settings, teacher_afs=g["afs"], teacher_step=teacher_step,
                                   num_steps_choices=(cfg.num_steps,) if step_cond else None)
    return first_net, make_student(first_net), settings, step_cond


def sampling_network(cfg: RunConfig, net, *, prepare: bool):
    """The network evaluation samples with, under the run's speed settings. A distilled student already has
    its group norm and memory format from training; a baseline's teacher gets them here (`prepare`). It is
    compiled only with `eval.compile`: the eval-mode graph (no dropout, no gradients) is a compile of its own,
    which at a low NFE costs more than it saves over 50k samples (see `sfd.bench sample --compile`)."""
    from sfd.compiling import maybe_compile
    from sfd.distill import prepare_network

    if prepare:
        prepare_network(net, channels_last=cfg.channels_last, group_norm=cfg.group_norm)
    return maybe_compile(net, cfg.eval.compile, cfg.compile_mode)


def _evaluate(cfg: RunConfig, teacher, net, step_condition: bool, device, *, num_steps: int | None = None,
              progress: bool = False, reference_cache: dict | None = None):
    from sfd.metrics.evaluate import evaluate, solver_sampler, student_sampler

    s = cfg.student
    if cfg.algorithm == "baseline":
        sampler = solver_sampler(net, cfg.solver.name, s.nfe, afs=s.afs, schedule=s.schedule,
                                 t_min=s.t_min, t_max=s.t_max, rho=s.rho, guidance=s.guidance,
                                 num_classes=teacher.num_classes, solver_opts=cfg.solver.opts)
    else:
        n = num_steps or cfg.num_steps
        sampler = student_sampler(net, C.grid_spec(cfg, n), step=n if step_condition else None,
                                  guidance=s.guidance, num_classes=teacher.num_classes)
    e = cfg.eval
    result = evaluate(sampler, teacher, e.metrics, e.num_samples, batch_size=e.batch_size, device=device,
                      precision=cfg.precision, progress=progress, gap_solver=e.gap_solver, gap_nfe=e.gap_nfe,
                      reference_cache=reference_cache)
    return result, sampler.nfe


def run_experiment(cfg: RunConfig, *, tracker=None, smoke: bool = False, progress: bool = False,
                   save_student: bool | None = None) -> RunResult:
    """Distil (or, for `baseline`, only sample), evaluate and log one run. See the module docstring.

    `save_student`: None keeps the default (every trained student is logged, except a smoke run's large
    random network); True logs it anyway (a study row that a later second-stage row starts from)."""
    from sfd.distill import distill
    from sfd.tracking import TAG_DEVICE, TAG_SEED, TAG_SMOKE, Tracker, device_description

    t_total = time.perf_counter()
    uri = tracker.tracking_uri if tracker is not None else None
    cfg, notes = prepare(cfg, smoke=smoke, tracking_uri=uri)
    device = resolve_device(cfg.device)
    if tracker is None:
        tracker = Tracker("experiments-smoke" if cfg.smoke else "experiments")
    missing = [m for m in tracker.objective if objective_key(m, cfg.smoke) not in computed_metrics(cfg)]
    if missing:
        raise ConfigError(f"objective metric(s) {missing} are not computed by this run (eval.metrics="
                          f"{cfg.eval.metrics}); add them to eval.metrics")
    tags = {TAG_SMOKE: str(cfg.smoke).lower(), TAG_DEVICE: device_description(device), TAG_SEED: cfg.seed,
            "sfd.algorithm": cfg.algorithm, **notes}
    if cfg.algorithm == "second-stage":  # which first-stage model (run id or folder) this one came from
        tags[TAG_FIRST_STAGE] = cfg.second_stage.first_stage
    teacher = load_teacher(cfg, device)  # before the run: a checkpoint that is not this teacher creates no run
    with tracker.start_run(cfg.name, tags=tags, every=cfg.log.every) as run:
        run.log_params(C.flatten(C.to_dict(cfg)))
        run.log_text(C.dump_yaml(cfg), "config.yaml")

        net, step_cond, train_s = teacher.net, False, 0.0
        torch.manual_seed(cfg.seed)  # the student's dropout (and new SFD-v layers) draw from the global generator
        if cfg.algorithm == "reference":  # a student trained elsewhere: evaluated as it is
            reference = load_reference(cfg.reference.path, cfg.teacher.name)
            net, step_cond = reference.net.to(device), reference.step_condition
            run.log_text(json.dumps(reference.training_kwargs, indent=2, default=str), "reference_training_kwargs.json")
        elif cfg.algorithm != "baseline":
            teacher_net, student, settings, step_cond = _distill_setup(cfg, teacher, device, tracker.tracking_uri)
            data = None
            if settings.algorithm == "vanilla" and not settings.vanilla_data_free:
                data = teacher.data(settings.batch_size, cfg.seed)
            callback = run.iteration_callback(afs=cfg.student.afs)
            t0 = time.perf_counter()
            net = distill(teacher_net, student, settings, teacher.shape, device=device, data=data, callback=callback)
            train_s = time.perf_counter() - t0
            run.flush()
            net.eval()

        t0 = time.perf_counter()
        sampling_net = sampling_network(cfg, net, prepare=cfg.algorithm in ("baseline", "reference"))
        references: dict = {}  # teacher-gap references: SFD-v's NFEs share one grid's endpoints
        result, nfe = _evaluate(cfg, teacher, sampling_net, step_cond, device, progress=progress,
                                reference_cache=references)
        metrics = dict(result.metrics)
        # the one step-conditioned model at every other trained (or asked) N
        other_steps = {"sfd-v": cfg.sfdv.num_steps_choices, "reference": cfg.reference.num_steps_choices or []}
        if step_cond:
            for n in other_steps.get(cfg.algorithm, []):
                if n != cfg.num_steps:
                    extra, extra_nfe = _evaluate(cfg, teacher, sampling_net, True, device, num_steps=n,
                                                 progress=progress, reference_cache=references)
                    metrics.update({f"{k}/nfe_{extra_nfe}": v for k, v in extra.metrics.items()})
        eval_s = time.perf_counter() - t0

        metrics.update({"nfe": nfe, "train/wall_s": train_s, "train/device_hours": train_s / 3600.0,
                        "eval/wall_s": eval_s, "eval/num_samples": result.num_samples})
        objective = objective_values(metrics, tracker.objective, cfg.smoke) if tracker.objective else []
        for i, value in enumerate(objective):
            metrics["objective" if i == 0 else f"objective_{i}"] = value
        run.log_image(result.grid_image, "samples.png")
        if cfg.algorithm not in ("baseline", "reference"):
            run.log_figure(_loss_curve(run.history), "loss_curve.png")
            if save_student or (save_student is None and not (cfg.smoke and not _is_small_teacher(cfg.teacher.name))):
                _save_student(run, net, sampling_info(cfg, teacher.num_classes, step_cond))
        metrics["total/wall_s"] = time.perf_counter() - t_total
        run.log_metrics(metrics, step=0)
    return RunResult(run_id=run.run_id, status="FINISHED", metrics=metrics, config=cfg, objective=objective,
                     notes=notes)
