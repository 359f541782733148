"""One run, start to end: pre-flight checks → (MLflow run) → train → evaluate → log.

Everything that can fail on bad input fails in `prepare` (sfd.runner.preflight), before the MLflow run exists.
Once it exists, any error ends it FAILED with the reason (`sfd.error`) and propagates; a diverging loss raises
`sfd.distill.DivergedError`.

Under torchrun (`ddp` > 1) every rank runs `run_experiment`: each trains on its share of the batch and samples its
share of the seeds (sfd.distill, sfd.metrics.evaluate); rank 0 alone creates and logs the MLflow run, the others
log through a `SilentTracker`. An error on any rank ends the run FAILED on rank 0 with the first failing rank's
reason (sfd.distributed).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure

from sfd.compiling import maybe_compile
from sfd.config import TRAINING_ALGORITHMS, RunConfig, dump_yaml, flatten, grid_spec, to_dict, to_settings
from sfd.distill import distill, make_student, prepare_network
from sfd.distributed import SINGLE, Ranks, process_group, rank_seed
from sfd.metrics.evaluate import EvalResult, evaluate, solver_sampler, student_sampler
from sfd.progress import Bars, counting
from sfd.runner.first_stage import check_first_stage
from sfd.runner.inputs import dataset_inputs
from sfd.runner.preflight import (check_ddp, check_objective, ddp_for_launch, is_small_teacher, load_teacher,
                                  objective_values, prepare, resolve_device)
from sfd.runner.strips import both, draws_strips, readable, strip_callback
from sfd.runner.students import load_saved_student, sampling_info, save_student
from sfd.runner.system_metrics import system_metrics
from sfd.teachers import Teacher
from sfd.threads import cpu_threads, thread_count
from sfd.tracking import (SAVED_STUDENT_TAGS, TAG_ALGORITHM, TAG_DEVICE, TAG_SEED, TAG_SMOKE, TAG_THREADS, RunLogger,
                          SilentTracker, Tracker, device_description)


EVALUATED_STUDENT_FILE = "evaluated_student.json"  # algorithm evaluate: the saved student's record, as read


@dataclass
class RunResult:
    run_id: str | None
    status: str  # FINISHED | FAILED
    metrics: dict[str, float]
    config: RunConfig
    objective: list[float] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)


def run_experiment(cfg: RunConfig, *, tracker: Tracker | None = None, smoke: bool = False, progress: Bars | None = None,
                   save_student: bool | None = None) -> RunResult:
    """Distil (or, for `baseline` and `evaluate`, only sample), evaluate and log one run. See the module docstring.

    `progress`: bars over the training iterations and the evaluation samples (sfd.progress; None: silent).
    `save_student`: None keeps the default (every trained student is logged, except a smoke run's large
    random network); True logs it anyway (a study row that a later second-stage row starts from). Under torchrun
    every rank returns the same metrics; only rank 0's result has the run id."""
    t_total = time.perf_counter()
    cfg = ddp_for_launch(cfg)
    cfg, notes = prepare(cfg, smoke=smoke, tracking_uri=tracker.tracking_uri if tracker is not None else None)
    device = resolve_device(cfg.device)
    check_ddp(cfg, device)
    if tracker is None:
        tracker = Tracker("experiments-smoke" if cfg.smoke else "experiments")
    check_objective(cfg, tracker.objective)
    with cpu_threads(thread_count(cfg.threads, device)), process_group(cfg.ddp, device) as ranks, ranks.failures():
        device = ranks.place(device)
        teacher = load_teacher(cfg, device)  # before the run: a checkpoint that is not this teacher creates no run
        if not ranks.is_main:  # rank 0 alone talks to MLflow
            tracker = SilentTracker(tracker)
        tags = _run_tags(cfg, device, notes)
        with tracker.start_run(cfg.name, tags=tags, every=cfg.log.every) as run, ranks.failures():
            run.log_params(flatten(to_dict(cfg)))
            run.log_inputs(dataset_inputs(cfg) if run.active else [])
            run.log_text(dump_yaml(cfg), "config.yaml")
            bars = progress if ranks.is_main else None
            with system_metrics(run, cfg.log.system_metrics):
                net, step_cond, metrics = _train(cfg, teacher, device, run, tracker.tracking_uri, ranks, bars)
                t0 = time.perf_counter()
                result, nfe, eval_metrics = _evaluate(cfg, teacher, net, step_cond, device, bars, ranks)
            metrics = {**eval_metrics, "nfe": nfe, **metrics, "eval/wall_s": time.perf_counter() - t0,
                       "eval/num_samples": result.num_samples}
            objective = objective_values(metrics, tracker.objective, cfg.smoke) if tracker.objective else []
            for i, value in enumerate(objective):
                metrics["objective" if i == 0 else f"objective_{i}"] = value
            _log_outputs(run, cfg, teacher, net, step_cond, result, save_student)
            metrics["total/wall_s"] = time.perf_counter() - t_total
            run.log_metrics(metrics, step=0)
    return RunResult(run_id=run.run_id, status="FINISHED", metrics=metrics, config=cfg, objective=objective,
                     notes=notes)


def _run_tags(cfg: RunConfig, device: torch.device, notes: dict[str, str]) -> dict:
    where = device_description(device) + (f" x{cfg.ddp}" if cfg.ddp > 1 else "")
    tags = {TAG_SMOKE: str(cfg.smoke).lower(), TAG_DEVICE: where, TAG_THREADS: torch.get_num_threads(),
            TAG_SEED: cfg.seed, TAG_ALGORITHM: cfg.algorithm, **notes}
    if cfg.saved_student is not None:  # which saved student (run id, folder, file) it continues or evaluates
        key, ref = cfg.saved_student
        tags[SAVED_STUDENT_TAGS[key][0]] = ref
    return tags


# ----- train -----------------------------------------------------------------------------------------------

def _distill_setup(cfg: RunConfig, teacher: Teacher, device, tracking_uri: str | None = None):
    """(teacher network, student, settings, step condition) for a training algorithm."""
    settings = to_settings(cfg, num_classes=teacher.num_classes)
    if cfg.algorithm == "sfd-v":
        return teacher.net, teacher.make_student(step_condition=True, step_init=cfg.sfdv.step_init), settings, True
    if cfg.algorithm != "second-stage":
        return teacher.net, teacher.make_student(), settings, False
    first_net, info = load_saved_student(cfg, device, tracking_uri)
    first_n = check_first_stage(cfg, info)
    step_cond = bool(info.get("step_condition"))
    settings = dataclasses.replace(settings, teacher_afs=info["grid"]["afs"], teacher_step=first_n if step_cond else None,
                                   num_steps_choices=(cfg.num_steps,) if step_cond else None)
    return first_net, make_student(first_net), settings, step_cond


def _train(cfg: RunConfig, teacher: Teacher, device, run: RunLogger, tracking_uri: str | None, ranks: Ranks = SINGLE,
           progress: Bars | None = None):
    """(the network to sample, whether it is step-conditioned, training metrics); a baseline trains nothing and
    samples its teacher, `evaluate` trains nothing and samples the saved student (its record logged). The cost is
    measured as wall time and as processor time, which does not depend on what else the machine runs
    (`training_cost`). Under DDP the metrics hold `ddp/max_weight_diff`, the largest difference between a rank's
    trained weights and rank 0's (0.0: DDP kept the ranks in step)."""
    torch.manual_seed(cfg.seed)  # the student's dropout (and new SFD-v layers) draw from the global generator
    untrained = {"train/wall_s": 0.0, "train/cpu_s": 0.0, "train/device_hours": 0.0}
    if cfg.algorithm == "baseline":
        return teacher.net, False, untrained
    if cfg.algorithm == "evaluate":
        net, info = load_saved_student(cfg, device, tracking_uri)
        run.log_text(json.dumps(info, indent=2, default=str), EVALUATED_STUDENT_FILE)
        return net, bool(info.get("step_condition")), untrained
    teacher_net, student, settings, step_cond = _distill_setup(cfg, teacher, device, tracking_uri)
    if ranks.rank:  # other ranks draw other dropout masks; rank 0 keeps the one-process stream
        torch.manual_seed(rank_seed(cfg.seed, ranks.rank))
    data = None
    if settings.algorithm == "vanilla" and not settings.vanilla_data_free:
        data = teacher.data(settings.batch_size, cfg.seed)  # the global batch: each rank keeps its rows
    callback = run.iteration_callback(afs=cfg.student.afs, loss=training_loss_name(cfg))
    if run.active and draws_strips(cfg, teacher):  # the image history: a strip of samples every so often
        callback = both(callback, strip_callback(cfg, teacher, student, step_cond, device, run.log_image_step,
                                                 settings.total_iterations))
    # a text teacher distils at guidance 1 (its conditional branch only): one random prompt per trajectory
    conditioning = teacher.condition.draw if teacher.condition is not None else None
    clock = Clock(device)
    with counting(progress, "train", settings.total_iterations, "it", callback) as callback:
        net = distill(teacher_net, student, settings, teacher.shape, device=device, data=data, callback=callback,
                      conditioning=conditioning, ranks=ranks)
    metrics = training_cost(clock.read(), device, ranks)
    run.flush()
    if ranks.distributed:
        metrics["ddp/max_weight_diff"] = ranks.weight_spread(net)
    return net.eval(), step_cond, metrics


class Clock:
    """Started at construction: wall time, this process's CPU time (all its threads) and, on a CUDA device, GPU time
    (between two CUDA events on the current stream)."""

    def __init__(self, device: torch.device):
        self.events = None
        if device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        """Seconds since the start: `wall_s`, `cpu_s` and (CUDA) `gpu_s`, once the device's queued work is done."""
        out = {}
        if self.events is not None:
            self.events[1].record()
            self.events[1].synchronize()
            out["gpu_s"] = self.events[0].elapsed_time(self.events[1]) / 1e3
        return {"wall_s": time.perf_counter() - self.wall, "cpu_s": time.process_time() - self.cpu, **out}


def training_cost(own: dict[str, float], device: torch.device, ranks: Ranks = SINGLE) -> dict[str, float]:
    """The training metrics of cost from this rank's `Clock.read()`: `train/wall_s` (rank 0's), `train/cpu_s` (CPU
    time of every rank's process, summed) and, on CUDA, `train/gpu_s` (GPU time summed over the ranks);
    `train/device_hours` is the cost a study compares: GPU-hours on CUDA, CPU core-hours otherwise. Processor time
    does not grow when other processes compete for the machine, as wall time does (see sfd.threads)."""
    summed = ranks.sum_(torch.tensor([own["cpu_s"], own.get("gpu_s", 0.0)], dtype=torch.float64, device=device))
    cpu_s, gpu_s = summed.tolist()
    metrics = {"train/wall_s": own["wall_s"], "train/cpu_s": cpu_s}
    if "gpu_s" in own:
        metrics["train/gpu_s"] = gpu_s
    metrics["train/device_hours"] = (gpu_s if "gpu_s" in own else cpu_s) / 3600.0
    return metrics


# ----- evaluate --------------------------------------------------------------------------------------------

def sampling_network(cfg: RunConfig, net, *, prepare: bool):
    """The network evaluation samples with, under the run's speed settings. A distilled student already has
    its group norm and memory format from training; a baseline's teacher or a loaded student gets them here
    (`prepare`). It is compiled only with `eval.compile`: the eval-mode graph (no dropout, no gradients) is a
    compile of its own, which at a low NFE costs more than it saves over 50k samples (see `sfd.bench sample
    --compile`)."""
    if prepare:
        prepare_network(net, channels_last=cfg.channels_last, group_norm=cfg.group_norm)
    return maybe_compile(net, cfg.eval.compile, cfg.compile_mode)


def _evaluate_at(cfg: RunConfig, teacher: Teacher, net, step_condition: bool, device, *, num_steps: int | None = None,
                 progress: Bars | None = None, reference_cache: dict | None = None,
                 ranks: Ranks = SINGLE) -> tuple[EvalResult, int]:
    """Sample and score at one NFE: the student on its grid with `num_steps` timestamps, or a baseline's solver."""
    s = cfg.student
    if cfg.algorithm == "baseline":
        sampler = solver_sampler(net, cfg.solver.name, s.nfe, afs=s.afs, schedule=s.schedule,
                                 t_min=s.t_min, t_max=s.t_max, rho=s.rho, guidance=s.guidance,
                                 num_classes=teacher.num_classes, solver_opts=cfg.solver.opts,
                                 prompts=teacher.condition)
    else:
        n = num_steps or cfg.num_steps
        sampler = student_sampler(net, grid_spec(cfg, n), step=n if step_condition else None,
                                  guidance=s.guidance, num_classes=teacher.num_classes, prompts=teacher.condition)
    e = cfg.eval
    result = evaluate(sampler, teacher, e.metrics, e.num_samples, batch_size=e.batch_size, device=device,
                      precision=cfg.precision, progress=progress, gap_solver=e.gap_solver, gap_nfe=e.gap_nfe,
                      fid_ref=e.reference, clip_scorer=clip_scorer(cfg, device), reference_cache=reference_cache,
                      ranks=ranks)
    return result, sampler.nfe


def clip_scorer(cfg: RunConfig, device):
    """The CLIP model clip_score scores with: eval.clip_model or the default folder; a smoke run's random tiny
    CLIP. None when the run does not compute clip_score."""
    if "clip_score" not in cfg.eval.metrics:
        return None
    from sfd.metrics import clip_score
    if cfg.smoke:
        return clip_score.tiny_clip_scorer(seed=0, device=device)
    return clip_score.CLIPScorer.from_folder(cfg.eval.clip_model or clip_score.default_clip_folder(), device=device)


def _evaluate(cfg: RunConfig, teacher: Teacher, net, step_cond: bool, device, progress: Bars | None,
              ranks: Ranks = SINGLE) -> tuple[EvalResult, int, dict[str, float]]:
    """The main NFE's result and NFE, and the metrics: the main NFE's, then a step-conditioned model's at every
    other trained (sfd-v) or asked (evaluate) NFE (suffixed `/nfe_<k>`)."""
    sampling_net = sampling_network(cfg, net, prepare=cfg.algorithm not in TRAINING_ALGORITHMS)
    references: dict = {}  # teacher-gap references: SFD-v's NFEs share one grid's endpoints
    result, nfe = _evaluate_at(cfg, teacher, sampling_net, step_cond, device, progress=progress,
                               reference_cache=references, ranks=ranks)
    metrics = dict(result.metrics)
    other_steps = {"sfd-v": cfg.sfdv.num_steps_choices, "evaluate": cfg.evaluate.num_steps_choices or []}
    if step_cond:  # the one model at every other N
        for n in other_steps.get(cfg.algorithm, []):
            if n != cfg.num_steps:
                extra, extra_nfe = _evaluate_at(cfg, teacher, sampling_net, True, device, num_steps=n,
                                                progress=progress, reference_cache=references, ranks=ranks)
                metrics.update({f"{k}/nfe_{extra_nfe}": v for k, v in extra.metrics.items()})
    return result, nfe, metrics


# ----- log -------------------------------------------------------------------------------------------------

def training_loss_name(cfg: RunConfig) -> str:
    """The loss a run trains with, as its training-loss metric names it (`sfd.tracking.train_loss_key`): `l1`, or
    `l2_final_lpips` for a second stage that adds LPIPS on its last student step."""
    return cfg.loss.name + (f"_final_{cfg.loss.final}" if cfg.loss.final else "")


def _loss_curve(history: dict[str, list[tuple[int, float]]]) -> Figure:
    mean = [k for k in history if k.startswith("train/loss_") and "/step_" not in k]
    keys = sorted(k for k in history if k.startswith("train/loss_") and "/step_" in k) or mean
    fig = Figure(figsize=(6, 3.6))  # no pyplot: no global backend state
    ax = fig.add_subplot()
    for key in keys:
        steps, values = zip(*history[key])
        ax.plot(steps, values, label=key.rsplit("/", 1)[-1].replace("_", " "), lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    if keys and all(v > 0 for k in keys for _, v in history[k]):
        ax.set_yscale("log")
    if len(keys) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _log_outputs(run: RunLogger, cfg: RunConfig, teacher: Teacher, net, step_cond: bool, result: EvalResult,
                 save: bool | None) -> None:
    """The sample grid; for a trained student, its loss curve and (unless a large smoke network) its weights.
    Rank 0's job alone under DDP."""
    if not run.active:
        return
    run.log_image(readable(result.grid_image), "samples.png")
    if cfg.algorithm not in TRAINING_ALGORITHMS:
        return
    run.log_figure(_loss_curve(run.history), "loss_curve.png")
    if save or (save is None and not (cfg.smoke and not is_small_teacher(cfg.teacher.name))):
        save_student(run, net, sampling_info(cfg, teacher.num_classes, step_cond), shape=teacher.shape)
