"""Before a run exists: validate, apply the smoke budget, resolve evaluation defaults, check every file the run
will read (teacher checkpoint, training images, FID statistics and Inception weights, LPIPS weights, a second
stage's first stage). Nothing here creates a run or a file; a failure is a ConfigError or an AssetError.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sfd.assets import FID_REFS, asset_path, file_version, require
from sfd.config import ConfigError, RunConfig, replace, validate
from sfd.distributed import launched_world_size, local_world_size
from sfd.losses import LPIPS_NETS
from sfd.metrics.evaluate import default_num_samples
from sfd.metrics.fd import check_reference_stats
from sfd.metrics.inception import FEATURE_DIM, check_inception_weights
from sfd.metrics.digits import check_digits_classifier
from sfd.metrics.names import METRICS, logged_keys, smoke_key, smoke_metric
from sfd.runner.first_stage import check_first_stage
from sfd.runner.students import REFERENCE_ALGORITHM, check_evaluated_student, saved_student_info
from sfd.teachers import Teacher, TeacherError, check_teacher_assets, get_teacher, teacher_spec
from sfd.teachers.edm_pickle import EDMPickleError
from sfd.tracking import TAG_SMOKE_NOTE

# A 56M-parameter SongUNet costs ~1-2 s per forward at batch 2 on a 2-core CPU: a smoke row is one iteration
# of batch 2 against a one-step-per-student-step teacher (M = 0), and two evaluation samples.
SMOKE_ITERATIONS = 1
SMOKE_BATCH = 2
SMOKE_M = 0
SMOKE_SAMPLES = 2
SMOKE_GAP_NFE = 1
SMALL_TEACHER_PREFIXES = ("digits", "gmm")  # teachers small enough to keep their student weights in smoke runs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: got {name!r}, but no CUDA device is available here; use device=cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: got {name!r}, but MPS is not available here; use device=cpu or auto")
    return device


def ddp_for_launch(cfg: RunConfig) -> RunConfig:
    """Under torchrun the number of processes is the run's `ddp`: a config that leaves ddp at 1 takes torchrun's
    world size, so the logged config replays the run as it ran."""
    world = launched_world_size()
    return replace(cfg, {"ddp": world}) if world > 1 and cfg.ddp == 1 else cfg


def check_ddp(cfg: RunConfig, device: torch.device, *, launched: bool = True) -> None:
    """`ddp` processes must be the ones torchrun started (when `launched`; before a relaunch, not yet) and, on
    CUDA, no more per machine than the devices this process sees."""
    world = launched_world_size()
    if launched and cfg.ddp != world:
        if world == 1:
            raise ConfigError(f"ddp: got {cfg.ddp}, but this process was not started by torchrun; run it with "
                              f"experiments/run.py (which relaunches itself under torchrun) or with torchrun "
                              f"--nproc-per-node {cfg.ddp} experiments/run.py ...")
        raise ConfigError(f"ddp: got {cfg.ddp}, but torchrun started {world} processes; give torchrun "
                          f"--nproc-per-node {cfg.ddp}, or leave ddp at 1 (it then follows torchrun)")
    if cfg.ddp > 1 and device.type == "cuda":
        here = local_world_size() if launched else cfg.ddp
        count = torch.cuda.device_count()
        if here > count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError(f"ddp: got {here} processes on this machine, but it sees {count} CUDA device(s)"
                              f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; lower ddp or "
                              "use device=cpu")


def is_small_teacher(name: str) -> bool:
    return name.startswith(SMALL_TEACHER_PREFIXES)


def default_metrics(teacher_name: str) -> list[str]:
    """The metrics a run reports when eval.metrics is null: the teacher's default metric."""
    return [teacher_spec(teacher_name).default_metric]


# ----- the smoke budget ---------------------------------------------------------------------------------

def _smoke_metrics(cfg: RunConfig, notes: dict[str, str]) -> list[str]:
    """The run's metrics with the smoke substitutes, each substitution noted."""
    metrics = []
    for m in cfg.eval.metrics or default_metrics(cfg.teacher.name):
        sub = smoke_metric(m)
        if sub != m:
            notes[f"{TAG_SMOKE_NOTE}metric.{m}"] = (f"{sub} on {SMOKE_SAMPLES} samples against a {SMOKE_GAP_NFE}-NFE "
                                                    "reference (FID needs Inception weights and 50k samples, and "
                                                    "means nothing on a random teacher)")
        if sub not in metrics:
            metrics.append(sub)
    return metrics


def smoke_config(cfg: RunConfig) -> tuple[RunConfig, dict[str, str]]:
    """The same run at a wiring-test budget: a random teacher of the right architecture, one iteration of
    batch 2 with M = 0, two evaluation samples, FID replaced by the teacher gap against a 1-NFE reference.
    Returns the config and notes (tagged on the run) saying what was substituted."""
    notes: dict[str, str] = {}
    # a multiple of ddp (the batch splits evenly over the processes), so at least one trajectory per process
    batch = max(cfg.ddp, min(cfg.optim.batch_size, SMOKE_BATCH) // cfg.ddp * cfg.ddp)
    updates: dict[str, Any] = {
        "smoke": True,
        "optim.batch_size": batch,
        "optim.total_kimg": SMOKE_ITERATIONS * batch / 1000,
        "optim.nan_check_every": 1,
        # the second stage's Euler teacher walks its first stage's own grid, so its M is not a budget knob
        "solver.m": cfg.solver.m if cfg.algorithm == "second-stage" else min(cfg.solver.m, SMOKE_M),
        "eval.metrics": _smoke_metrics(cfg, notes),
        "eval.num_samples": SMOKE_SAMPLES,
        "eval.batch_size": SMOKE_SAMPLES,
        "eval.gap_nfe": SMOKE_GAP_NFE,
        "log.every": SMOKE_ITERATIONS,
    }
    if cfg.compile or cfg.eval.compile:  # compiling would take longer than the one iteration it speeds up
        updates.update({"compile": False, "compile_mode": None, "eval.compile": False})
        notes[f"{TAG_SMOKE_NOTE}compile"] = "off (a one-iteration wiring check would spend its time compiling)"
    if cfg.algorithm == "sfd-v":  # evaluate at every trained N: keep it to two (the main one and another)
        updates["sfdv.num_steps_choices"] = sorted({cfg.num_steps, max(cfg.sfdv.num_steps_choices)})
    if cfg.algorithm == "evaluate" and cfg.evaluate.num_steps_choices:  # the same two N a smoke SFD-v row trains
        updates["evaluate.num_steps_choices"] = sorted({cfg.num_steps, max(cfg.evaluate.num_steps_choices)})
    for key, asset in lpips_assets(cfg).items():
        if asset_path(asset) is None:
            updates[f"loss.{key}"] = "l2"
            notes[f"{TAG_SMOKE_NOTE}loss.{key}"] = f"l2 instead of lpips ({asset} weights are not installed)"
    if not is_small_teacher(cfg.teacher.name):
        notes[f"{TAG_SMOKE_NOTE}student_weights"] = "not saved (a random network of this size is not worth storing)"
    notes[f"{TAG_SMOKE_NOTE}budget"] = (f"{SMOKE_ITERATIONS} iteration(s) of batch {batch}, solver.m="
                                        f"{updates['solver.m']}, {SMOKE_SAMPLES} evaluation samples")
    return replace(cfg, updates), notes


# ----- the files a run reads ----------------------------------------------------------------------------

def lpips_assets(cfg: RunConfig) -> dict[str, str]:
    """The LPIPS weights asset of each LPIPS loss in the run, by loss key: `name` takes `loss.opts.net`; the
    `final`-step loss is built without options (sfd.distill), so it is VGG's."""
    assets = {}
    if cfg.loss.name == "lpips":
        assets["name"] = LPIPS_NETS[cfg.loss.opts.get("net", "vgg")]
    if cfg.loss.final == "lpips":
        assets["final"] = LPIPS_NETS["vgg"]
    return assets


INCEPTION = "inception-2015-12-05"  # the Inception-v3 FID weights asset


def needed_assets(cfg: RunConfig) -> list[str]:
    """The named assets a (validated) run reads, in the order `check_assets` checks them: the teacher's checkpoint
    (unless teacher.path names the file) and training images (Algorithm 1 on real data), the Inception weights and
    the FID statistics (fid), LPIPS weights. A smoke run reads none."""
    if cfg.smoke:
        return []
    spec = teacher_spec(cfg.teacher.name)
    names = []
    if spec.source == "checkpoint" and cfg.teacher.path is None:
        names.append(spec.checkpoint)
    if cfg.algorithm == "vanilla" and cfg.vanilla.data == "dataset" and spec.data_asset:
        names.append(spec.data_asset)
    if "fid" in (cfg.eval.metrics or default_metrics(cfg.teacher.name)) and spec.dataset in FID_REFS:
        names += [INCEPTION, FID_REFS[spec.dataset]]
    return names + list(lpips_assets(cfg).values())


def missing_assets(cfg: RunConfig) -> list[str]:
    """The assets of `needed_assets` that are nowhere in their search paths."""
    return [name for name in needed_assets(cfg) if asset_path(name) is None]


def _check_teacher_files(name: str, path: str | None, needs_data: bool = False) -> None:
    try:
        check_teacher_assets(name, path, needs_data=needs_data)
    except TeacherError as exc:  # a file that is there but is not this teacher's checkpoint
        raise ConfigError(str(exc)) from None


def check_assets(cfg: RunConfig, tracking_uri: str | None = None, student_info: dict | None = None) -> None:
    """Raise MissingAssetError / ConfigError for anything the run will need but cannot find — before any
    run or file is created. A saved student the run reads (a second stage's first stage, the student `evaluate`
    samples) is located (downloaded once from its run, or read from its snapshot) and its grid checked against
    the run's; `student_info` (a sampling.json-like dict with the `grid`) stands in for one that does not exist
    yet (a study row run earlier in the study)."""
    metrics = cfg.eval.metrics or default_metrics(cfg.teacher.name)
    if not cfg.smoke or teacher_spec(cfg.teacher.name).source == "embedded":  # a smoke run samples those as they are
        _check_teacher_files(cfg.teacher.name, cfg.teacher.path,
                             needs_data=cfg.algorithm == "vanilla" and cfg.vanilla.data == "dataset")
    if any(METRICS[m].needs_classifier for m in metrics):  # a smoke run scores digits metrics too
        check_digits_classifier()
    if not cfg.smoke:
        if "fid" in metrics:
            dataset = teacher_spec(cfg.teacher.name).dataset
            if dataset not in FID_REFS:
                raise ConfigError(f"eval.metrics: fid has no reference statistics for teacher {cfg.teacher.name!r}")
            check_fid_files(require(INCEPTION), require(FID_REFS[dataset]))
        for asset in lpips_assets(cfg).values():
            require(asset)
    if cfg.saved_student is None:
        return
    if student_info is None:
        student_info = saved_student_info(cfg, tracking_uri)
        # ours is rebuilt from its own teacher's checkpoint (a reference snapshot holds its whole network)
        if student_info["algorithm"] != REFERENCE_ALGORITHM and not student_info.get("smoke"):
            _check_teacher_files(student_info["teacher"], student_info.get("teacher_path"))
    if cfg.algorithm == "second-stage":
        check_first_stage(cfg, student_info)
    else:
        check_evaluated_student(cfg, student_info)


_CHECKED_FID_FILES: set[tuple] = set()


def check_fid_files(inception_weights: Path, reference_stats: Path) -> None:
    """The Inception weights load and the reference statistics are finite 2048-d ones, or a ConfigError
    naming the file, before a run trains. Each file version is read once per process (a study's rows share
    them)."""
    for path, check in ((Path(inception_weights), check_inception_weights),
                        (Path(reference_stats), lambda p: check_reference_stats(p, FEATURE_DIM))):
        version = file_version(path)
        if version not in _CHECKED_FID_FILES:
            try:
                check(path)
            except ValueError as exc:
                raise ConfigError(f"eval.metrics: fid: {exc}") from None
            _CHECKED_FID_FILES.add(version)


_TEACHER_CACHE: dict[tuple, Teacher] = {}


def load_teacher(cfg: RunConfig, device) -> Teacher:
    """`sfd.teachers.get_teacher`, keeping the last teacher: a study's trials share it (it is frozen and never
    trained), so a checkpoint is read once per study, not once per trial."""
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
    if not cfg.smoke and teacher_spec(cfg.teacher.name).source == "checkpoint":
        load_teacher(cfg, resolve_device(device or cfg.device))


# ----- what the run computes ----------------------------------------------------------------------------

def resolve_eval(cfg: RunConfig) -> RunConfig:
    """Fill eval.metrics / eval.num_samples left null with their defaults, so the logged YAML replays exactly
    this run."""
    if cfg.eval.metrics is not None and cfg.eval.num_samples is not None:
        return cfg
    metrics = cfg.eval.metrics or default_metrics(cfg.teacher.name)
    num = cfg.eval.num_samples or default_num_samples(None, metrics)
    return replace(cfg, {"eval.metrics": metrics, "eval.num_samples": num})


def computed_metrics(cfg: RunConfig) -> set[str]:
    """The final metric names a run of this (resolved) config logs."""
    return logged_keys(cfg.eval.metrics or default_metrics(cfg.teacher.name))


def objective_key(name: str, smoke: bool) -> str:
    """The metric a run logs for objective `name` (a smoke run's teacher gap stands in for FID)."""
    return smoke_key(name) if smoke else name


def objective_values(metrics: dict[str, float], names: list[str], smoke: bool) -> list[float]:
    return [metrics[objective_key(name, smoke)] for name in names]


def check_objective(cfg: RunConfig, objective: list[str]) -> None:
    """Every objective metric must be one this run computes."""
    missing = [m for m in objective if objective_key(m, cfg.smoke) not in computed_metrics(cfg)]
    if missing:
        raise ConfigError(f"objective metric(s) {missing} are not computed by this run (eval.metrics="
                          f"{cfg.eval.metrics}); add them to eval.metrics")


def prepare(cfg: RunConfig, *, smoke: bool = False, tracking_uri: str | None = None,
            student_info: dict | None = None) -> tuple[RunConfig, dict[str, str]]:
    """Validate, apply the smoke budget when asked, resolve evaluation defaults, check assets (see
    `check_assets` for `student_info`). Creates nothing."""
    validate(cfg)
    notes: dict[str, str] = {}
    if smoke and not cfg.smoke:
        cfg, notes = smoke_config(cfg)
    cfg = resolve_eval(cfg)
    check_assets(cfg, tracking_uri, student_info)
    return cfg, notes
