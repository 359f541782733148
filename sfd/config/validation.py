"""Checking a run config before anything exists: one small function per section, then the algorithm's own rules.

Every error is a `ConfigError` naming the field, the bad value and what is allowed. Facts about teachers come
from their specs (`sfd.teachers.teacher_spec`), so nothing is loaded: a metric that cannot score the teacher's
samples (`class_accuracy` on an unconditional teacher, `fd_digits` on a mixture) is refused here, not after
training.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import typing
from pathlib import Path
from typing import Mapping

import torch

from sfd.config.coercion import coerce, shown
from sfd.config.schema import (ALGORITHMS, COMPILE_MODES, ROW_REF_PREFIX, TRAINING_ALGORITHMS, VANILLA_DATA,
                               ConfigError, RunConfig)
from sfd.config.settings import to_settings
from sfd.losses import LOSS_FNS, LOSSES, LPIPS_NETS
from sfd.metrics.names import METRICS, unfit_reason
from sfd.networks.edm import GROUP_NORMS, STEP_INITS
from sfd.sampling import PRECISIONS
from sfd.schedules import SCHEDULES
from sfd.solvers import SOLVERS, num_steps_for_nfe, solve
from sfd.teachers import TEACHERS, TeacherError, teacher_spec
from sfd.teachers.reference import is_reference_snapshot
from sfd.threads import AUTO, is_thread_setting

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Upper bounds for what could not finish or fit (a slip of the keyboard's extra zeros), each far above what the
# paper or any shipped config uses; checked before anything is built (a grid of 10^9 NFE alone is 8 GB). The
# README's "Bad input" section lists them.
MAX_NFE = 1000  # student.nfe, eval.gap_nfe, SFD-v's N - 2: the paper distils to 1-5 NFE, its solvers use <= 50
MAX_SOLVER_M = 100  # solver.m: teacher steps per student step; the paper uses M = 3 (the second stage 2)
MAX_BATCH = 65_536  # optim.batch_size, eval.batch_size: the paper trains on 128 trajectories per iteration
MAX_NUM_SAMPLES = 1_000_000  # eval.num_samples: FID uses 50,000
MAX_TOTAL_KIMG = 200_000.0  # optim.total_kimg: SFD trains 200 kimg, its second stage 2,000; EDM's teachers 200,000
MAX_DDP = 256  # ddp: processes for one run
MAX_NAME_LENGTH = 200  # name: the MLflow run's name (a study's runs are <study>/<row id>)
# Sections that only one algorithm reads: set for another, they would be logged as if they had been used.
_ALGORITHM_SECTIONS = {"vanilla": "vanilla", "sfdv": "sfd-v", "second_stage": "second-stage", "evaluate": "evaluate"}


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field against what is allowed; raise ConfigError naming the first bad one. Solver and loss
    options are converted in place to the types the run passes them as."""
    for check in (_check_run, _check_ddp, _check_teacher, _check_student, _check_solver, _check_loss, _check_optim,
                  _check_eval, _check_algorithm):
        check(cfg)
    return cfg


# ----- helpers ------------------------------------------------------------------------------------------

def _suggest(value, allowed) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=2, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: got {shown(value)}; allowed: {', '.join(map(str, allowed))}{_suggest(value, allowed)}")


def _positive(key: str, value, strict: bool = True) -> None:
    bad = not math.isfinite(value) or (value <= 0 if strict else value < 0)
    if bad:
        raise ConfigError(f"{key}: got {shown(value)}; must be {'>' if strict else '>='} 0")


def _at_least_one(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key}: got {shown(value)}; must be >= 1")


def _at_most(key: str, value, bound, why: str) -> None:
    """`value` must not exceed `bound`: larger could not finish or fit (the module's MAX_* constants)."""
    if value > bound:
        raise ConfigError(f"{key}: got {shown(value)}; at most {bound:,g} ({why})")


def _check_grid(cfg: RunConfig, key: str, num_steps: int) -> None:
    if num_steps < 2:
        raise ConfigError(f"{key}: got N={num_steps} timestamps; need at least 2")
    if num_steps > MAX_NFE + 2:
        raise ConfigError(f"{key}: got N={num_steps} timestamps; at most {MAX_NFE + 2} (NFE {MAX_NFE}; the paper "
                          "distils to 1-5 NFE)")
    if cfg.student.afs and num_steps < 3:
        raise ConfigError(f"{key}: got N={num_steps} with student.afs=true: AFS replaces the first step, so it "
                          "needs at least 2 student steps (N >= 3); set student.afs=false or raise N")


def _check_opts(key: str, owner: str, fn, opts: dict, *, framework_args: int,
                set_elsewhere: Mapping[str, str] = {}) -> dict:
    """`opts` checked against the keyword parameters of `fn` (a solver, a loss function or class) after the
    `framework_args` positional ones the caller passes itself: names (a typo would be a TypeError, or silently
    ignored, once the run exists) and, where an annotation or a default shows it, value types. Returns the
    options converted (1 -> 1.0 for a float, '5e-5' -> 5e-05), as the run will pass them."""
    params = {n: p for n, p in list(inspect.signature(fn).parameters.items())[framework_args:]
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in set_elsewhere}
    try:
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except Exception:  # an annotation that does not resolve: fall back to the defaults' types
        hints = {}
    out = {}
    for name, value in opts.items():
        if name in set_elsewhere:
            raise ConfigError(f"{key}.{name}: not an option of {owner}; it is set by {set_elsewhere[name]}")
        if not params:
            raise ConfigError(f"{key}: got {shown(opts)}; {owner} takes no options (use {key}={{}})")
        if name not in params:
            raise ConfigError(f"{key}.{name}: unknown option of {owner}; allowed: {', '.join(params)}"
                              + _suggest(name, params))
        default = params[name].default
        tp = hints.get(name, type(default) if default not in (None, inspect.Parameter.empty) else None)
        try:
            value = coerce(value, tp, f"{key}.{name}") if tp is not None else value
        except TypeError:  # a type config values cannot spell (a tensor, a callable): left to the callee
            pass
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}.{name}: got {shown(value)}; must be a finite number")
        out[name] = value
    return out


def _dry_run_solver(name: str, opts: dict) -> None:
    """Run the solver on a 3-point grid with a zero denoiser, so that its own range checks (e.g. ipndm's
    max_order in 1..4) fail here rather than inside the run; it costs microseconds."""
    try:
        solve(name, lambda x, t: torch.zeros_like(x), torch.ones(1, 2), [2.0, 1.0, 0.5], **opts)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"solver.opts: got {shown(opts)}; {exc}") from None


# ----- one function per section -------------------------------------------------------------------------

def _check_run(cfg: RunConfig) -> None:
    """The run-level fields: algorithm, precision, speed options, device, threads, seed."""
    _choice("algorithm", cfg.algorithm, ALGORITHMS)
    _choice("precision", cfg.precision, PRECISIONS)
    if cfg.compile_mode is not None:
        _choice("compile_mode", cfg.compile_mode, COMPILE_MODES)
        if not (cfg.compile or cfg.eval.compile):
            raise ConfigError(f"compile_mode: got {cfg.compile_mode!r} with compile=false and eval.compile=false; "
                              "set compile=true (training) or eval.compile=true (sampling), or compile_mode=null")
    _choice("group_norm", cfg.group_norm, GROUP_NORMS)
    if not _DEVICE.match(cfg.device):
        raise ConfigError(f"device: got {cfg.device!r}; allowed: auto, cpu, cuda, cuda:<index>, mps")
    if not is_thread_setting(cfg.threads):
        raise ConfigError(f"threads: got {cfg.threads!r}; allowed: {AUTO} or an integer >= 1")
    if not 0 <= cfg.seed < 2**63:  # torch and numpy generators take 64-bit seeds; studies use 0, 1, 2, ...
        raise ConfigError(f"seed: got {cfg.seed!r}; must be an integer in [0, 2**63)")
    if not 0 < len(cfg.name) <= MAX_NAME_LENGTH:
        raise ConfigError(f"name: got a name of {len(cfg.name)} characters; 1 to {MAX_NAME_LENGTH} (it names the "
                          "MLflow run)")


def _check_ddp(cfg: RunConfig) -> None:
    """One run on several processes: each takes its own device (cpu, or cuda:<local rank>) and an equal share of
    the batch. How many CUDA devices there are is checked when the run starts (sfd.runner.preflight.check_ddp)."""
    _at_least_one("ddp", cfg.ddp)
    _at_most("ddp", cfg.ddp, MAX_DDP, "processes for one run")
    if cfg.ddp == 1:
        return
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: got {cfg.device!r} with ddp={cfg.ddp}; each process takes its own device, so use "
                          "device=cuda (process i on cuda:i of those visible), cpu or auto")
    if cfg.algorithm in TRAINING_ALGORITHMS and cfg.optim.batch_size % cfg.ddp:
        raise ConfigError(f"optim.batch_size: got {cfg.optim.batch_size} with ddp={cfg.ddp}; the batch is split "
                          f"evenly over the processes, so it must be a multiple of {cfg.ddp}")


def _check_teacher(cfg: RunConfig) -> None:
    t = cfg.teacher
    try:
        spec = teacher_spec(t.name)
    except TeacherError:
        raise ConfigError(f"teacher.name: got {t.name!r}; allowed: {', '.join(TEACHERS)}"
                          + _suggest(t.name, TEACHERS)) from None
    if t.path is not None and spec.source != "checkpoint":  # it would be logged as if it had been used
        raise ConfigError(f"teacher.path: got {t.path!r}; teacher {t.name!r} is {spec.source}, so teacher.path "
                          "does not apply (it names the checkpoint of an EDM teacher); use teacher.path=null")
    if t.path is not None and not cfg.smoke and not Path(t.path).expanduser().exists():
        raise ConfigError(f"teacher.path: got {t.path!r}; the file does not exist")


def _check_student(cfg: RunConfig) -> None:
    s = cfg.student
    if not 1 <= s.nfe <= MAX_NFE:
        raise ConfigError(f"student.nfe: got {s.nfe!r}; must be an integer in 1..{MAX_NFE} (the paper distils to "
                          "1-5 NFE)")
    _choice("student.schedule", s.schedule, sorted(SCHEDULES))
    _positive("student.t_min", s.t_min)
    if not s.t_min < s.t_max or not math.isfinite(s.t_max):
        raise ConfigError(f"student.t_min / student.t_max: got t_min={s.t_min!r}, t_max={s.t_max!r}; "
                          "need 0 < t_min < t_max")
    _positive("student.rho", s.rho)
    _positive("student.guidance", s.guidance, strict=False)
    if s.guidance != 1.0 and not teacher_spec(cfg.teacher.name).num_classes:
        raise ConfigError(f"student.guidance: got {s.guidance}; teacher {cfg.teacher.name!r} is unconditional, so "
                          "classifier-free guidance does not apply (use 1.0)")


def _check_solver(cfg: RunConfig) -> None:
    s = cfg.solver
    _choice("solver.name", s.name, sorted(SOLVERS))
    if not 0 <= s.m <= MAX_SOLVER_M:
        raise ConfigError(f"solver.m: got {s.m!r}; must be in 0..{MAX_SOLVER_M} (intermediate teacher steps per "
                          "student step; the paper uses 3)")
    s.opts = _check_opts("solver.opts", f"solver {s.name!r}", SOLVERS[s.name], s.opts, framework_args=3,
                         set_elsewhere={"afs": "solver.afs"})
    _dry_run_solver(s.name, s.opts)


def _check_loss(cfg: RunConfig) -> None:
    loss = cfg.loss
    _choice("loss.name", loss.name, LOSSES)
    fn = LOSS_FNS[loss.name]
    loss.opts = _check_opts("loss.opts", f"loss {loss.name!r}", fn, loss.opts,
                            framework_args=0 if isinstance(fn, type) else 2)  # a module takes pred, target later
    if loss.name == "lpips":  # LPIPSLoss would refuse another net only once the run exists
        _choice("loss.opts.net", loss.opts.get("net", "vgg"), list(LPIPS_NETS))
    if loss.final is not None:
        _choice("loss.final", loss.final, LOSSES)


def _check_optim(cfg: RunConfig) -> None:
    """The optimiser, the budget and the logging cadence."""
    o = cfg.optim
    _positive("optim.lr", o.lr)
    _positive("optim.total_kimg", o.total_kimg)
    _at_most("optim.total_kimg", o.total_kimg, MAX_TOTAL_KIMG, "thousands of trajectories; the paper trains 200")
    _positive("optim.eps", o.eps)
    _at_least_one("optim.batch_size", o.batch_size)
    _at_most("optim.batch_size", o.batch_size, MAX_BATCH, "trajectories per iteration; the paper uses 128")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: got {o.betas!r}; need two numbers in [0, 1)")
    if not 0 <= o.lr_decay_at <= 1:
        raise ConfigError(f"optim.lr_decay_at: got {o.lr_decay_at!r}; a fraction of the budget in [0, 1]")
    _positive("optim.lr_decay_factor", o.lr_decay_factor)
    _at_least_one("optim.nan_check_every", o.nan_check_every)
    _at_least_one("log.every", cfg.log.every)


def _check_eval(cfg: RunConfig) -> None:
    e = cfg.eval
    for i, metric in enumerate(e.metrics or []):
        _choice(f"eval.metrics[{i}]", metric, METRICS)
        _check_metric_fits_teacher(f"eval.metrics[{i}]", metric, cfg.teacher.name)
    if e.metrics is not None and not e.metrics:
        raise ConfigError("eval.metrics: got []; name at least one metric, or null for the teacher's default")
    if e.num_samples is not None and not 1 <= e.num_samples <= MAX_NUM_SAMPLES:
        raise ConfigError(f"eval.num_samples: got {e.num_samples!r}; must be in 1..{MAX_NUM_SAMPLES:,} (FID uses "
                          "50,000), or null for the default")
    _at_least_one("eval.batch_size", e.batch_size)
    _at_most("eval.batch_size", e.batch_size, MAX_BATCH, "samples per batch")
    _choice("eval.gap_solver", e.gap_solver, sorted(SOLVERS))
    _at_most("eval.gap_nfe", e.gap_nfe, MAX_NFE, "evaluations of the teacher's reference solution; default 50")
    try:
        num_steps_for_nfe(e.gap_solver, e.gap_nfe, False)
    except ValueError as exc:
        raise ConfigError(f"eval.gap_nfe: got {e.gap_nfe!r}; {exc}") from None


def _check_metric_fits_teacher(key: str, metric: str, teacher: str) -> None:
    """A digits metric on other data, or class accuracy without classes, would fail only after training."""
    spec = teacher_spec(teacher)
    reason = unfit_reason(metric, teacher, spec.dataset, spec.num_classes)
    if reason:
        raise ConfigError(f"{key}: {reason}; name a metric that teacher {teacher!r} supports, e.g. "
                          f"{spec.default_metric}")


# ----- the algorithm's own rules ------------------------------------------------------------------------

def _check_algorithm(cfg: RunConfig) -> None:
    _choice("vanilla.data", cfg.vanilla.data, VANILLA_DATA)
    _check_sections_apply(cfg)
    if cfg.algorithm == "baseline":
        _check_baseline(cfg)
        return
    if cfg.algorithm == "evaluate":
        _check_evaluate(cfg)
        return
    if cfg.algorithm == "sfd-v":
        _check_sfdv(cfg)
    else:
        _check_grid(cfg, "student.nfe", cfg.num_steps)
    if cfg.algorithm == "second-stage":
        _check_second_stage(cfg)
    if cfg.algorithm == "vanilla":
        _check_vanilla(cfg)
    try:
        to_settings(cfg).validate()
    except ValueError as exc:  # a check the core knows that this module does not repeat
        raise ConfigError(f"invalid settings for the distillation core: {exc}") from None


def _check_sections_apply(cfg: RunConfig) -> None:
    defaults = RunConfig()
    for section, algorithm in _ALGORITHM_SECTIONS.items():
        if cfg.algorithm == algorithm:
            continue
        ours, default = getattr(cfg, section), getattr(defaults, section)
        for f in dataclasses.fields(ours):
            if getattr(ours, f.name) != getattr(default, f.name):
                raise ConfigError(f"{section}.{f.name}: got {getattr(ours, f.name)!r}, but only algorithm={algorithm} "
                                  f"reads it and this run is algorithm={cfg.algorithm}; remove it (default "
                                  f"{getattr(default, f.name)!r})")


def _check_baseline(cfg: RunConfig) -> None:
    if cfg.loss.final is not None:
        raise ConfigError(f"loss.final: got {cfg.loss.final!r}; a baseline only samples the teacher, it trains "
                          "nothing")
    if cfg.solver.afs:
        raise ConfigError("solver.afs: got true; it is the teacher's AFS inside distillation, and a baseline only "
                          "samples the teacher: set student.afs for the baseline's sampling grid instead")
    try:
        num_steps_for_nfe(cfg.solver.name, cfg.student.nfe, cfg.student.afs)
    except ValueError:
        raise ConfigError(
            f"student.nfe: got {cfg.student.nfe!r}; solver {cfg.solver.name} with student.afs="
            f"{str(cfg.student.afs).lower()} cannot spend exactly that many evaluations "
            "(two-evaluation solvers need an even NFE without AFS, odd with AFS)") from None


def _check_evaluate(cfg: RunConfig) -> None:
    """A saved student sampled as it is: it must be named, and its grid (checked against the student's own record
    once it is located, in the runner's pre-flight) must be a usable one at every N asked."""
    ref, choices = cfg.evaluate.student, cfg.evaluate.num_steps_choices
    if not ref:
        raise ConfigError("evaluate.student: got null; name the saved student to evaluate (an MLflow run id, a "
                          "student/ folder or .safetensors file, an SFD reference network-snapshot .pkl, or in a "
                          f"study {ROW_REF_PREFIX}<id>)")
    if is_reference_snapshot(ref) and teacher_spec(cfg.teacher.name).source == "analytic":
        raise ConfigError(f"teacher.name: got {cfg.teacher.name!r}; a reference-trained student is an EDM network, "
                          "so its teacher is one (an EDM checkpoint or an embedded digits teacher)")
    if cfg.loss.final is not None:
        raise ConfigError(f"loss.final: got {cfg.loss.final!r}; algorithm=evaluate only samples, it trains nothing")
    _check_grid(cfg, "student.nfe", cfg.num_steps)
    for i, n in enumerate(choices or []):
        _check_grid(cfg, f"evaluate.num_steps_choices[{i}]", n)
    if choices is not None and (not choices or len(set(choices)) != len(choices)):
        raise ConfigError(f"evaluate.num_steps_choices: got {choices}; each N once, or null for student.nfe's only")


def _check_sfdv(cfg: RunConfig) -> None:
    _choice("sfdv.step_init", cfg.sfdv.step_init, STEP_INITS)
    if teacher_spec(cfg.teacher.name).source == "analytic":
        raise ConfigError(f"algorithm: sfd-v needs a step-conditioned EDM network student; teacher "
                          f"{cfg.teacher.name!r} is analytic (its student is a small MLP)")
    choices = cfg.sfdv.num_steps_choices
    if not choices:
        raise ConfigError("sfdv.num_steps_choices: got []; give the student timestamps N to train, e.g. [4,5,6,7]")
    for i, n in enumerate(choices):
        _check_grid(cfg, f"sfdv.num_steps_choices[{i}]", n)
    if len(set(choices)) != len(choices):  # a repeated N would be drawn more often than spec §9's uniform draw
        raise ConfigError(f"sfdv.num_steps_choices: got {choices}; each N once (N is drawn uniformly)")
    if cfg.num_steps not in choices:
        raise ConfigError(f"student.nfe: got {cfg.student.nfe} (N={cfg.num_steps}); with sfd-v it is the NFE "
                          f"reported as the main result and must be one of the trained N {choices}")


def _check_second_stage(cfg: RunConfig) -> None:
    if not cfg.second_stage.first_stage:
        raise ConfigError("second_stage.first_stage: got null; name the first-stage model (an MLflow run id, a "
                          "student/ folder or .safetensors file written by a first-stage run, an SFD reference "
                          f"network-snapshot .pkl, or in a study {ROW_REF_PREFIX}<id>)")
    if cfg.solver.name != "euler":
        raise ConfigError(f"solver.name: got {cfg.solver.name!r}; the second stage samples its first-stage "
                          "teacher with its own Euler sampler, so it must be euler")


def _check_vanilla(cfg: RunConfig) -> None:
    if cfg.vanilla.data == "dataset" and not teacher_spec(cfg.teacher.name).has_training_images:
        raise ConfigError(f"vanilla.data: got 'dataset', but teacher {cfg.teacher.name!r} has no training-image "
                          "source for Algorithm 1; use vanilla.data=teacher (start from the teacher's trajectory)")
    if cfg.loss.final is not None:
        raise ConfigError("loss.final: Algorithm 1 trains one random step per iteration; a final-step loss "
                          "applies to sfd / sfd-v / second-stage only")
