"""One run, start to end: pre-flight checks → (MLflow run) → train → evaluate → log.

Everything that can fail on bad input fails in `prepare` (sfd.runner.preflight), before the MLflow run exists.
Once it exists, any error ends it FAILED with the reason (`sfd.error`) and propagates; a diverging loss raises
`sfd.distill.DivergedError`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure
from PIL import Image

from sfd.compiling import maybe_compile
from sfd.config import RunConfig, dump_yaml, flatten, grid_spec, to_dict, to_settings
from sfd.distill import distill, make_student, prepare_network
from sfd.metrics.evaluate import EvalResult, evaluate, solver_sampler, student_sampler
from sfd.runner.first_stage import check_first_stage, load_first_stage, locate_first_stage, sampling_info, save_student
from sfd.runner.preflight import (check_objective, is_small_teacher, load_teacher, objective_values, prepare,
                                  resolve_device)
from sfd.teachers import Teacher
from sfd.tracking import (TAG_ALGORITHM, TAG_DEVICE, TAG_FIRST_STAGE, TAG_SEED, TAG_SMOKE, RunLogger, Tracker,
                          device_description)


# samples.png is enlarged to at least this many pixels on its longer side (a digits grid is 73 pixels wide).
SAMPLES_MIN_SIDE = 512


@dataclass
class RunResult:
    run_id: str | None
    status: str  # FINISHED | FAILED
    metrics: dict[str, float]
    config: RunConfig
    objective: list[float] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)


def run_experiment(cfg: RunConfig, *, tracker: Tracker | None = None, smoke: bool = False, progress: bool = False,
                   save_student: bool | None = None) -> RunResult:
    """Distil (or, for `baseline`, only sample), evaluate and log one run. See the module docstring.

    `save_student`: None keeps the default (every trained student is logged, except a smoke run's large
    random network); True logs it anyway (a study row that a later second-stage row starts from)."""
    t_total = time.perf_counter()
    cfg, notes = prepare(cfg, smoke=smoke, tracking_uri=tracker.tracking_uri if tracker is not None else None)
    device = resolve_device(cfg.device)
    if tracker is None:
        tracker = Tracker("experiments-smoke" if cfg.smoke else "experiments")
    check_objective(cfg, tracker.objective)
    teacher = load_teacher(cfg, device)  # before the run: a checkpoint that is not this teacher creates no run
    with tracker.start_run(cfg.name, tags=_run_tags(cfg, device, notes), every=cfg.log.every) as run:
        run.log_params(flatten(to_dict(cfg)))
        run.log_text(dump_yaml(cfg), "config.yaml")
        net, step_cond, train_s = _train(cfg, teacher, device, run, tracker.tracking_uri)
        t0 = time.perf_counter()
        result, nfe, metrics = _evaluate(cfg, teacher, net, step_cond, device, progress)
        metrics.update({"nfe": nfe, "train/wall_s": train_s, "train/device_hours": train_s / 3600.0,
                        "eval/wall_s": time.perf_counter() - t0, "eval/num_samples": result.num_samples})
        objective = objective_values(metrics, tracker.objective, cfg.smoke) if tracker.objective else []
        for i, value in enumerate(objective):
            metrics["objective" if i == 0 else f"objective_{i}"] = value
        _log_outputs(run, cfg, teacher, net, step_cond, result, save_student)
        metrics["total/wall_s"] = time.perf_counter() - t_total
        run.log_metrics(metrics, step=0)
    return RunResult(run_id=run.run_id, status="FINISHED", metrics=metrics, config=cfg, objective=objective,
                     notes=notes)


def _run_tags(cfg: RunConfig, device: torch.device, notes: dict[str, str]) -> dict:
    tags = {TAG_SMOKE: str(cfg.smoke).lower(), TAG_DEVICE: device_description(device), TAG_SEED: cfg.seed,
            TAG_ALGORITHM: cfg.algorithm, **notes}
    if cfg.algorithm == "second-stage":  # which first-stage model (run id or folder) this one came from
        tags[TAG_FIRST_STAGE] = cfg.second_stage.first_stage
    return tags


# ----- train -----------------------------------------------------------------------------------------------

def _distill_setup(cfg: RunConfig, teacher: Teacher, device, tracking_uri: str | None = None):
    """(teacher network, student, settings, step condition) for a training algorithm."""
    settings = to_settings(cfg, num_classes=teacher.num_classes)
    if cfg.algorithm == "sfd-v":
        return teacher.net, teacher.make_student(step_condition=True), settings, True
    if cfg.algorithm != "second-stage":
        return teacher.net, teacher.make_student(), settings, False
    first_net, info = load_first_stage(locate_first_stage(cfg.second_stage.first_stage, tracking_uri), device)
    first_n = check_first_stage(cfg, info)
    step_cond = bool(info.get("step_condition"))
    settings = dataclasses.replace(settings, teacher_afs=info["grid"]["afs"], teacher_step=first_n if step_cond else None,
                                   num_steps_choices=(cfg.num_steps,) if step_cond else None)
    return first_net, make_student(first_net), settings, step_cond


def _train(cfg: RunConfig, teacher: Teacher, device, run: RunLogger, tracking_uri: str | None):
    """(the network to sample, whether it is step-conditioned, training seconds); a baseline trains nothing and
    samples its teacher."""
    torch.manual_seed(cfg.seed)  # the student's dropout (and new SFD-v layers) draw from the global generator
    if cfg.algorithm == "baseline":
        return teacher.net, False, 0.0
    teacher_net, student, settings, step_cond = _distill_setup(cfg, teacher, device, tracking_uri)
    data = None
    if settings.algorithm == "vanilla" and not settings.vanilla_data_free:
        data = teacher.data(settings.batch_size, cfg.seed)
    callback = run.iteration_callback(afs=cfg.student.afs)
    t0 = time.perf_counter()
    net = distill(teacher_net, student, settings, teacher.shape, device=device, data=data, callback=callback)
    train_s = time.perf_counter() - t0
    run.flush()
    return net.eval(), step_cond, train_s


# ----- evaluate --------------------------------------------------------------------------------------------

def sampling_network(cfg: RunConfig, net, *, prepare: bool):
    """The network evaluation samples with, under the run's speed settings. A distilled student already has
    its group norm and memory format from training; a baseline's teacher gets them here (`prepare`). It is
    compiled only with `eval.compile`: the eval-mode graph (no dropout, no gradients) is a compile of its own,
    which at a low NFE costs more than it saves over 50k samples (see `sfd.bench sample --compile`)."""
    if prepare:
        prepare_network(net, channels_last=cfg.channels_last, group_norm=cfg.group_norm)
    return maybe_compile(net, cfg.eval.compile, cfg.compile_mode)


def _evaluate_at(cfg: RunConfig, teacher: Teacher, net, step_condition: bool, device, *, num_steps: int | None = None,
                 progress: bool = False, reference_cache: dict | None = None) -> tuple[EvalResult, int]:
    """Sample and score at one NFE: the student on its grid with `num_steps` timestamps, or a baseline's solver."""
    s = cfg.student
    if cfg.algorithm == "baseline":
        sampler = solver_sampler(net, cfg.solver.name, s.nfe, afs=s.afs, schedule=s.schedule,
                                 t_min=s.t_min, t_max=s.t_max, rho=s.rho, guidance=s.guidance,
                                 num_classes=teacher.num_classes, solver_opts=cfg.solver.opts)
    else:
        n = num_steps or cfg.num_steps
        sampler = student_sampler(net, grid_spec(cfg, n), step=n if step_condition else None,
                                  guidance=s.guidance, num_classes=teacher.num_classes)
    e = cfg.eval
    result = evaluate(sampler, teacher, e.metrics, e.num_samples, batch_size=e.batch_size, device=device,
                      precision=cfg.precision, progress=progress, gap_solver=e.gap_solver, gap_nfe=e.gap_nfe,
                      reference_cache=reference_cache)
    return result, sampler.nfe


def _evaluate(cfg: RunConfig, teacher: Teacher, net, step_cond: bool, device,
              progress: bool) -> tuple[EvalResult, int, dict[str, float]]:
    """The main NFE's result and NFE, and the metrics: the main NFE's, then an SFD-v model's at every other
    trained NFE (suffixed `/nfe_<k>`)."""
    sampling_net = sampling_network(cfg, net, prepare=cfg.algorithm == "baseline")
    references: dict = {}  # teacher-gap references: SFD-v's NFEs share one grid's endpoints
    result, nfe = _evaluate_at(cfg, teacher, sampling_net, step_cond, device, progress=progress,
                               reference_cache=references)
    metrics = dict(result.metrics)
    if cfg.algorithm == "sfd-v":  # the one model at every other trained NFE
        for n in cfg.sfdv.num_steps_choices:
            if n != cfg.num_steps:
                extra, extra_nfe = _evaluate_at(cfg, teacher, sampling_net, True, device, num_steps=n,
                                                progress=progress, reference_cache=references)
                metrics.update({f"{k}/nfe_{extra_nfe}": v for k, v in extra.metrics.items()})
    return result, nfe, metrics


# ----- log -------------------------------------------------------------------------------------------------

def _loss_curve(history: dict[str, list[tuple[int, float]]]) -> Figure:
    keys = sorted(k for k in history if k.startswith("loss/step_")) or (["loss"] if "loss" in history else [])
    fig = Figure(figsize=(6, 3.6))  # no pyplot: no global backend state
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


def readable(image: Image.Image) -> Image.Image:
    """A small sample grid enlarged by a whole factor, nearest neighbour (each pixel a sharp square block), to at
    least SAMPLES_MIN_SIDE pixels on its longer side; a grid that large already is returned as it is."""
    factor = math.ceil(SAMPLES_MIN_SIDE / max(image.size))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _log_outputs(run: RunLogger, cfg: RunConfig, teacher: Teacher, net, step_cond: bool, result: EvalResult,
                 save: bool | None) -> None:
    """The sample grid; for a trained student, its loss curve and (unless a large smoke network) its weights."""
    run.log_image(readable(result.grid_image), "samples.png")
    if cfg.algorithm == "baseline":
        return
    run.log_figure(_loss_curve(run.history), "loss_curve.png")
    if save or (save is None and not (cfg.smoke and not is_small_teacher(cfg.teacher.name))):
        save_student(run, net, sampling_info(cfg, teacher.num_classes, step_cond))
