"""Typed run configuration: one `RunConfig` describes one run completely; its YAML replays it.

    cfg = load_config("experiments/digits_sfd.yaml", ["student.nfe=3", "loss.name=l2"])
    settings = to_settings(cfg, num_classes=teacher.num_classes)

Overrides are `dotted.key=value` with YAML-typed values (`student.afs=false`, `sfdv.num_steps_choices=[4,5]`,
`teacher.path=null`). Every error is a `ConfigError` naming the field, the bad value and what is allowed, and
is raised by `load_config` / `validate` before anything (run, study, file) is created. A resolved config
dumped with `dump_yaml` loads back to an equal config.

Algorithms:
- `sfd` — Algorithm 2 (global trajectory distillation, spec §6).
- `vanilla` — Algorithm 1; `vanilla.data: dataset` draws real training images (`teacher.data`), `teacher`
  starts from the teacher's own trajectory instead (data-free).
- `sfd-v` — one step-conditioned student trained over `sfdv.num_steps_choices` (N, default 4–7: NFE 2–5).
- `second-stage` — 1-NFE distillation from a first-stage student (`second_stage.first_stage`: an MLflow run id
  or a folder / .safetensors path), sampled as teacher with Euler on its own grid (spec §10).
- `baseline` — no training: the teacher sampled with `solver.name` at `student.nfe` on the `student.*` grid
  (the "solver-based methods" rows of the paper's tables).
- `reference` — no training: a student the SFD reference implementation trained (`reference.path`, its
  network-snapshot-NNNNNN.pkl) evaluated on its own grid, which `student.*` must state (the run checks it).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

ALGORITHMS = ("sfd", "vanilla", "sfd-v", "second-stage", "baseline", "reference")
TRAINING_ALGORITHMS = ("sfd", "vanilla", "sfd-v", "second-stage")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
VANILLA_DATA = ("dataset", "teacher")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A bad configuration: the message names the field, the bad value and what is allowed."""


# ----- the schema ---------------------------------------------------------------------------------------

@dataclass
class TeacherConfig:
    name: str = "digits"  # see sfd.teachers.TEACHERS
    path: str | None = None  # checkpoint file overriding the named asset's location


@dataclass
class StudentConfig:
    """The student's sampling grid (for `baseline`: the grid the teacher's solver walks)."""

    nfe: int = 2
    afs: bool = True
    schedule: str = "polynomial"
    t_min: float = 0.006
    t_max: float = 80.0
    rho: float = 7.0
    guidance: float = 1.0  # classifier-free guidance scale at sampling (conditional teachers)


@dataclass
class SolverConfig:
    """The teacher's solver: M intermediate steps per student step (K = M + 1), no AFS by default (spec §4)."""

    name: str = "dpmpp3m"
    m: int = 3
    afs: bool = False
    opts: dict = field(default_factory=dict)


@dataclass
class LossConfig:
    name: str = "l1"
    opts: dict = field(default_factory=dict)
    final: str | None = None  # an extra loss on the last student step (second stage: lpips)


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_decay_at: float = 0.5
    lr_decay_factor: float = 10.0
    total_kimg: float = 200.0
    batch_size: int = 128
    nan_check_every: int = 50


@dataclass
class VanillaConfig:
    data: str = "dataset"  # dataset: real training images; teacher: states on the teacher's trajectory


@dataclass
class SFDVConfig:
    num_steps_choices: list[int] = field(default_factory=lambda: [4, 5, 6, 7])
    step_init: str = "random"  # the new step layers: random as the reference, or zero (student = teacher at start)


@dataclass
class SecondStageConfig:
    # MLflow run id, a folder / .safetensors written by a first-stage run, or an SFD reference network-snapshot .pkl
    first_stage: str | None = None
    first_stage_step: int | None = None  # step condition of an SFD-v first stage (e.g. 7); None: plain SFD


@dataclass
class ReferenceConfig:
    """A student trained by the SFD reference implementation (algorithm `reference`)."""

    path: str | None = None  # its network-snapshot-NNNNNN.pkl
    num_steps_choices: list[int] | None = None  # an SFD-v student: also evaluated at each of these N


@dataclass
class EvalConfig:
    metrics: list[str] | None = None  # None: the teacher's default metric
    num_samples: int | None = None  # None: sfd.metrics.evaluate.default_num_samples
    batch_size: int = 256
    gap_solver: str = "dpmpp3m"
    gap_nfe: int = 50
    # torch.compile the sampled network (with the run's compile_mode). Off by default: at NFE 2 compiling the
    # eval-mode graph costs more than it saves over 50k samples (measure with `sfd.bench sample --compile`).
    compile: bool = False


@dataclass
class LogConfig:
    every: int = 50  # iterations between batched metric writes


@dataclass
class RunConfig:
    name: str = "run"
    algorithm: str = "sfd"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 (TF32 off) | tf32 | bf16 (autocast, fp32 master weights); sfd.sampling
    # Speed options for image networks (see the README's "Speed (GPU)"): results change only by rounding, but a
    # channels-last student draws other dropout masks (they follow memory order), as another seed would.
    compile: bool = False  # torch.compile teacher and student (falls back to eager if compiling fails)
    compile_mode: str | None = None  # torch.compile mode, e.g. reduce-overhead (CUDA graphs); null: torch's default
    channels_last: bool = False  # NHWC activations for the convolutions
    group_norm: str = "native"  # channel-stats: group statistics from per-channel ones (see sfd.networks.edm)
    smoke: bool = False  # a randomly initialised teacher of the right architecture: proves wiring, not numbers
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    vanilla: VanillaConfig = field(default_factory=VanillaConfig)
    sfdv: SFDVConfig = field(default_factory=SFDVConfig)
    second_stage: SecondStageConfig = field(default_factory=SecondStageConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def num_steps(self) -> int:
        """Student timestamps N: the student is an Euler sampler, so N = NFE + 2 with AFS, NFE + 1 without."""
        return self.student.nfe + (2 if self.student.afs else 1)


# ----- typed conversion ---------------------------------------------------------------------------------

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp, key: str) -> Any:
    """`value` as type `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads 5e-5 (no dot) as a string; it is plainly a number
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
    if tp is float:
        return float(value)
    if tp is dict:
        return dict(value)
    return value


def all_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted field name of the schema, e.g. `student.t_min`."""
    cls = cls or RunConfig
    keys = []
    for name, tp in _hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown(key: str, known: Iterable[str]) -> ConfigError:
    known = list(known)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:  # a misspelt last part under the right section, or the right name in another section
        last = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            last, [k.rsplit(".", 1)[-1] for k in known], n=3, cutoff=0.75)][:3]
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _build(cls, data: Mapping, prefix: str = ""):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(dotted, all_keys())
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def from_dict(data: Mapping | None) -> RunConfig:
    """A RunConfig from a nested mapping (fields not given keep their defaults). Not yet validated."""
    return _build(RunConfig, data or {})


def to_dict(cfg) -> dict:
    """The config as a nested dict of plain YAML types."""
    return dataclasses.asdict(cfg)


def flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'student': {'nfe': 2}} -> {'student.nfe': 2}. Values that are mappings inside a field (solver.opts)
    are flattened too; an empty one stays as {}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_value(data: dict, key: str, value: Any) -> None:
    """Set a dotted `key` in a nested dict (creating sections), checking the key against the schema.

    Keys inside a dict-valued field are free (`solver.opts.max_order`)."""
    parts = key.split(".")
    cls, node = RunConfig, data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if cls is None:  # inside a dict field: free-form keys
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        hints = _hints(cls)
        if part not in hints:
            raise _unknown(key, all_keys())
        tp = hints[part]
        if last:
            if dataclasses.is_dataclass(tp) and not isinstance(value, Mapping):
                raise ConfigError(f"{key} is a section; set one of its fields, e.g. {all_keys(tp, key + '.')[0]}")
            node[part] = value
            return
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif tp is dict:
            cls = None
        else:
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section (in key {key!r})")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a YAML-typed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. student.nfe=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip(), value


def merge(data: dict, updates: Mapping[str, Any] | Iterable[str] | None) -> dict:
    """A copy of the nested dict `data` with `updates` applied: a mapping of dotted (or nested) keys, or a
    list of `key=value` strings."""
    import copy

    out = copy.deepcopy(data)
    if updates is None:
        return out
    if isinstance(updates, Mapping):
        items = flatten_updates(updates)
    else:
        items = [parse_override(u) for u in updates]
    for key, value in items:
        set_value(out, key, value)
    return out


def flatten_updates(updates: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested or dotted update mappings as (dotted key, value) pairs; stops at schema leaves, so a dict
    value for `solver.opts` is set whole."""
    items = []
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and _is_section(dotted):
            items.extend(flatten_updates(value, f"{dotted}."))
        else:
            items.append((dotted, value))
    return items


def _is_section(dotted: str) -> bool:
    cls = RunConfig
    for part in dotted.split("."):
        tp = _hints(cls).get(part) if cls else None
        if tp is None or not dataclasses.is_dataclass(tp):
            return False
        cls = tp
    return True


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file; name a config "
                          "file, e.g. experiments/digits_sfd.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:  # an empty or comment-only file: taken as all defaults, it would start a full-length run
        raise ConfigError(f"config file {str(path)!r} is empty (no settings); write the config's sections into it, "
                          "e.g. start from a copy of experiments/digits_sfd.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Mapping | Iterable[str] | None = None, *,
                validate_config: bool = True) -> RunConfig:
    """Defaults <- YAML file <- overrides, converted to types and validated."""
    data = read_yaml(path) if path is not None else {}
    cfg = from_dict(merge(data, overrides))
    if validate_config:
        validate(cfg)
    return cfg


def replace(cfg: RunConfig, overrides: Mapping | Iterable[str]) -> RunConfig:
    """A new, validated config with `overrides` applied."""
    cfg2 = from_dict(merge(to_dict(cfg), overrides))
    validate(cfg2)
    return cfg2


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_yaml(cfg: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(dump_yaml(cfg))
    return path


# ----- validation ---------------------------------------------------------------------------------------

def _suggest(value, allowed) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=2, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(map(str, allowed))}{_suggest(value, allowed)}")


def _positive(key: str, value, strict: bool = True) -> None:
    bad = not math.isfinite(value) or (value <= 0 if strict else value < 0)
    if bad:
        raise ConfigError(f"{key}: got {value!r}; must be {'>' if strict else '>='} 0")


def _check_grid(cfg: RunConfig, key: str, num_steps: int) -> None:
    if num_steps < 2:
        raise ConfigError(f"{key}: got N={num_steps} timestamps; need at least 2")
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
            raise ConfigError(f"{key}: got {opts!r}; {owner} takes no options (use {key}={{}})")
        if name not in params:
            raise ConfigError(f"{key}.{name}: unknown option of {owner}; allowed: {', '.join(params)}"
                              + _suggest(name, params))
        default = params[name].default
        tp = hints.get(name, type(default) if default not in (None, inspect.Parameter.empty) else None)
        try:
            value = _coerce(value, tp, f"{key}.{name}") if tp is not None else value
        except TypeError:  # a type config values cannot spell (a tensor, a callable): left to the callee
            pass
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}.{name}: got {value!r}; must be a finite number")
        out[name] = value
    return out


def _dry_run_solver(name: str, opts: dict) -> None:
    """Run the solver on a 3-point grid with a zero denoiser, so that its own range checks (e.g. ipndm's
    max_order in 1..4) fail here rather than inside the run; it costs microseconds."""
    import torch

    from sfd.solvers import solve

    try:
        solve(name, lambda x, t: torch.zeros_like(x), torch.ones(1, 2), [2.0, 1.0, 0.5], **opts)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"solver.opts: got {opts!r}; {exc}") from None


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field against what is allowed; raise ConfigError naming the first bad one."""
    from sfd.losses import LOSS_FNS, LOSSES, LPIPS_NETS
    from sfd.metrics.evaluate import METRICS
    from sfd.sampling import PRECISIONS
    from sfd.schedules import SCHEDULES
    from sfd.solvers import SOLVERS, num_steps_for_nfe
    from sfd.teachers import TEACHERS
    from sfd.teachers.registry import check_teacher_name, teacher_source

    _choice("algorithm", cfg.algorithm, ALGORITHMS)
    _choice("precision", cfg.precision, PRECISIONS)
    if cfg.compile_mode is not None:
        _choice("compile_mode", cfg.compile_mode, COMPILE_MODES)
        if not (cfg.compile or cfg.eval.compile):
            raise ConfigError(f"compile_mode: got {cfg.compile_mode!r} with compile=false and eval.compile=false; "
                              "set compile=true (training) or eval.compile=true (sampling), or compile_mode=null")
    from sfd.networks.edm import GROUP_NORMS

    _choice("group_norm", cfg.group_norm, GROUP_NORMS)
    if not _DEVICE.match(cfg.device):
        raise ConfigError(f"device: got {cfg.device!r}; allowed: auto, cpu, cuda, cuda:<index>, mps")
    try:
        check_teacher_name(cfg.teacher.name)
    except ValueError:
        raise ConfigError(f"teacher.name: got {cfg.teacher.name!r}; allowed: {', '.join(TEACHERS)}"
                          + _suggest(cfg.teacher.name, TEACHERS)) from None
    source = teacher_source(cfg.teacher.name)
    if cfg.teacher.path is not None and source != "checkpoint":  # it would be logged as if it had been used
        raise ConfigError(f"teacher.path: got {cfg.teacher.path!r}; teacher {cfg.teacher.name!r} is {source}, so "
                          "teacher.path does not apply (it names the checkpoint of an EDM teacher); use "
                          "teacher.path=null")
    if cfg.teacher.path is not None and not cfg.smoke and not Path(cfg.teacher.path).expanduser().exists():
        raise ConfigError(f"teacher.path: got {cfg.teacher.path!r}; the file does not exist")

    if not 0 <= cfg.seed < 2**63:  # torch and numpy generators take 64-bit seeds; studies use 0, 1, 2, ...
        raise ConfigError(f"seed: got {cfg.seed!r}; must be an integer in [0, 2**63)")
    s = cfg.student
    if s.nfe < 1:
        raise ConfigError(f"student.nfe: got {s.nfe!r}; must be an integer >= 1")
    _choice("student.schedule", s.schedule, sorted(SCHEDULES))
    _positive("student.t_min", s.t_min)
    if not s.t_min < s.t_max or not math.isfinite(s.t_max):
        raise ConfigError(f"student.t_min / student.t_max: got t_min={s.t_min!r}, t_max={s.t_max!r}; "
                          "need 0 < t_min < t_max")
    _positive("student.rho", s.rho)
    _positive("student.guidance", s.guidance, strict=False)
    if s.guidance != 1.0 and not cfg.teacher.name.endswith("-cond"):
        raise ConfigError(f"student.guidance: got {s.guidance}; teacher {cfg.teacher.name!r} is unconditional, so "
                          "classifier-free guidance does not apply (use 1.0)")

    _choice("solver.name", cfg.solver.name, sorted(SOLVERS))
    if cfg.solver.m < 0:
        raise ConfigError(f"solver.m: got {cfg.solver.m!r}; must be >= 0 (intermediate teacher steps)")
    _choice("loss.name", cfg.loss.name, LOSSES)
    cfg.solver.opts = _check_opts("solver.opts", f"solver {cfg.solver.name!r}", SOLVERS[cfg.solver.name],
                                  cfg.solver.opts, framework_args=3, set_elsewhere={"afs": "solver.afs"})
    _dry_run_solver(cfg.solver.name, cfg.solver.opts)
    fn = LOSS_FNS[cfg.loss.name]
    cfg.loss.opts = _check_opts("loss.opts", f"loss {cfg.loss.name!r}", fn, cfg.loss.opts,
                                framework_args=0 if isinstance(fn, type) else 2)  # a module takes pred, target later
    if cfg.loss.name == "lpips":  # LPIPSLoss would refuse another net only once the run exists
        _choice("loss.opts.net", cfg.loss.opts.get("net", "vgg"), list(LPIPS_NETS))
    if cfg.loss.final is not None:
        _choice("loss.final", cfg.loss.final, LOSSES)

    o = cfg.optim
    _positive("optim.lr", o.lr)
    _positive("optim.total_kimg", o.total_kimg)
    _positive("optim.eps", o.eps)
    if o.batch_size < 1:
        raise ConfigError(f"optim.batch_size: got {o.batch_size!r}; must be >= 1")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: got {o.betas!r}; need two numbers in [0, 1)")
    if not 0 <= o.lr_decay_at <= 1:
        raise ConfigError(f"optim.lr_decay_at: got {o.lr_decay_at!r}; a fraction of the budget in [0, 1]")
    _positive("optim.lr_decay_factor", o.lr_decay_factor)
    if o.nan_check_every < 1:
        raise ConfigError(f"optim.nan_check_every: got {o.nan_check_every!r}; must be >= 1")
    if cfg.log.every < 1:
        raise ConfigError(f"log.every: got {cfg.log.every!r}; must be >= 1")

    e = cfg.eval
    for i, metric in enumerate(e.metrics or []):
        _choice(f"eval.metrics[{i}]", metric, METRICS)
    if e.metrics is not None and not e.metrics:
        raise ConfigError("eval.metrics: got []; name at least one metric, or null for the teacher's default")
    if e.num_samples is not None and e.num_samples < 1:
        raise ConfigError(f"eval.num_samples: got {e.num_samples!r}; must be >= 1 (or null for the default)")
    if e.batch_size < 1:
        raise ConfigError(f"eval.batch_size: got {e.batch_size!r}; must be >= 1")
    _choice("eval.gap_solver", e.gap_solver, sorted(SOLVERS))
    try:
        num_steps_for_nfe(e.gap_solver, e.gap_nfe, False)
    except ValueError as exc:
        raise ConfigError(f"eval.gap_nfe: got {e.gap_nfe!r}; {exc}") from None

    _choice("vanilla.data", cfg.vanilla.data, VANILLA_DATA)
    _validate_algorithm(cfg)
    return cfg


# Sections that only one algorithm reads: set for another, they would be logged as if they had been used.
_ALGORITHM_SECTIONS = {"vanilla": "vanilla", "sfdv": "sfd-v", "second_stage": "second-stage", "reference": "reference"}


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
    if cfg.algorithm in ("baseline", "reference") and cfg.loss.final is not None:
        raise ConfigError(f"loss.final: got {cfg.loss.final!r}; algorithm={cfg.algorithm} only samples, it trains "
                          "nothing")
    if cfg.algorithm == "baseline" and cfg.solver.afs:
        raise ConfigError("solver.afs: got true; it is the teacher's AFS inside distillation, and a baseline only "
                          "samples the teacher: set student.afs for the baseline's sampling grid instead")


def _validate_algorithm(cfg: RunConfig) -> None:
    from sfd.solvers import num_steps_for_nfe

    _check_sections_apply(cfg)
    alg = cfg.algorithm
    if alg == "baseline":
        try:
            num_steps_for_nfe(cfg.solver.name, cfg.student.nfe, cfg.student.afs)
        except ValueError:
            raise ConfigError(
                f"student.nfe: got {cfg.student.nfe!r}; solver {cfg.solver.name} with student.afs="
                f"{str(cfg.student.afs).lower()} cannot spend exactly that many evaluations "
                "(two-evaluation solvers need an even NFE without AFS, odd with AFS)") from None
        return
    if alg == "reference":
        _validate_reference(cfg)
        return
    if alg == "sfd-v":
        from sfd.networks.edm import STEP_INITS

        _choice("sfdv.step_init", cfg.sfdv.step_init, STEP_INITS)
        if cfg.teacher.name.startswith("gmm"):
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
    else:
        _check_grid(cfg, "student.nfe", cfg.num_steps)
    if alg == "second-stage":
        if not cfg.second_stage.first_stage:
            raise ConfigError("second_stage.first_stage: got null; name the first-stage model (an MLflow run id, "
                              "or a folder / .safetensors file written by a first-stage run)")
        if cfg.solver.name != "euler":
            raise ConfigError(f"solver.name: got {cfg.solver.name!r}; the second stage samples its first-stage "
                              "teacher with its own Euler sampler, so it must be euler")
    from sfd.teachers.registry import has_training_images

    if alg == "vanilla" and cfg.vanilla.data == "dataset" and not has_training_images(cfg.teacher.name):
        raise ConfigError(f"vanilla.data: got 'dataset', but teacher {cfg.teacher.name!r} has no training-image "
                          "source for Algorithm 1; use vanilla.data=teacher (start from the teacher's trajectory)")
    if alg == "vanilla" and cfg.loss.final is not None:
        raise ConfigError("loss.final: Algorithm 1 trains one random step per iteration; a final-step loss "
                          "applies to sfd / sfd-v / second-stage only")
    try:
        to_settings(cfg).validate()
    except ValueError as exc:  # a check the core knows that this module does not repeat
        raise ConfigError(f"invalid settings for the distillation core: {exc}") from None


def _validate_reference(cfg: RunConfig) -> None:
    from sfd.teachers.registry import teacher_source

    r = cfg.reference
    if not r.path:
        raise ConfigError("reference.path: got null; name the network-snapshot-NNNNNN.pkl the SFD reference saved")
    if not Path(r.path).expanduser().is_file():
        raise ConfigError(f"reference.path: got {r.path!r}; the file does not exist")
    if teacher_source(cfg.teacher.name) == "analytic":
        raise ConfigError(f"teacher.name: got {cfg.teacher.name!r}; a reference-trained student is an EDM network, "
                          "so its teacher is one (an EDM checkpoint or an embedded digits teacher)")
    _check_grid(cfg, "student.nfe", cfg.num_steps)
    for i, n in enumerate(r.num_steps_choices or []):
        _check_grid(cfg, f"reference.num_steps_choices[{i}]", n)


# ----- mapping onto the core ----------------------------------------------------------------------------

def grid_spec(cfg: RunConfig, num_steps: int | None = None):
    from sfd.sampling import GridSpec

    s = cfg.student
    return GridSpec(num_steps=num_steps or cfg.num_steps, afs=s.afs, schedule=s.schedule, t_min=s.t_min,
                    t_max=s.t_max, rho=s.rho)


def to_settings(cfg: RunConfig, *, num_classes: int = 0, teacher_afs: bool | None = None,
                teacher_step: int | None = None):
    """The core's DistillSettings for a training algorithm (sfd-v and second-stage map onto the same loop:
    a list of N choices with a step-conditioned student, or an Euler teacher with the first stage's AFS)."""
    from sfd.distill import DistillSettings

    if cfg.algorithm not in TRAINING_ALGORITHMS:
        raise ConfigError(f"algorithm {cfg.algorithm!r} does not train; there are no distillation settings")
    o = cfg.optim
    choices = tuple(cfg.sfdv.num_steps_choices) if cfg.algorithm == "sfd-v" else None
    return DistillSettings(
        algorithm="vanilla" if cfg.algorithm == "vanilla" else "sfd",
        grid=grid_spec(cfg),
        num_steps_choices=choices,
        teacher_solver=cfg.solver.name,
        teacher_opts=dict(cfg.solver.opts),
        teacher_afs=cfg.solver.afs if teacher_afs is None else teacher_afs,
        teacher_step=teacher_step,
        m=cfg.solver.m,
        loss=cfg.loss.name,
        loss_opts=dict(cfg.loss.opts),
        final_loss=cfg.loss.final,
        lr=o.lr,
        betas=(o.betas[0], o.betas[1]),
        eps=o.eps,
        lr_decay_at=o.lr_decay_at,
        lr_decay_factor=o.lr_decay_factor,
        batch_size=o.batch_size,
        total_kimg=o.total_kimg,
        num_classes=num_classes,
        precision=cfg.precision,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        channels_last=cfg.channels_last,
        group_norm=cfg.group_norm,
        seed=cfg.seed,
        vanilla_data_free=cfg.vanilla.data == "teacher",
        nan_check_every=o.nan_check_every,
    )
