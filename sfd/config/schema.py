"""The run config's schema: one `RunConfig` of typed sections describes one run completely (see `sfd.config`).

Algorithms:
- `sfd` — Algorithm 2 (global trajectory distillation, spec §6).
- `vanilla` — Algorithm 1; `vanilla.data: dataset` draws real training images (`teacher.data`), `teacher`
  starts from the teacher's own trajectory instead (data-free).
- `sfd-v` — one step-conditioned student trained over `sfdv.num_steps_choices` (N, default 4–7: NFE 2–5).
- `second-stage` — 1-NFE distillation from a first-stage student (`second_stage.first_stage`: a saved student,
  see below), sampled as teacher with Euler on its own grid (spec §10).
- `baseline` — no training: the teacher sampled with `solver.name` at `student.nfe` on the `student.*` grid
  (the "solver-based methods" rows of the paper's tables).
- `evaluate` — no training: a saved student (`evaluate.student`) sampled on its own grid, which `student.*` must
  state (the run checks it against the student's own record); `student.guidance` is free.

A saved student is named by an MLflow run id, a `student/` folder or its .safetensors file (what a training run
logs), a `network-snapshot-NNNNNN.pkl` the SFD reference implementation saved, or, in a study, `row:<id>`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

ALGORITHMS = ("sfd", "vanilla", "sfd-v", "second-stage", "baseline", "evaluate")
TRAINING_ALGORITHMS = ("sfd", "vanilla", "sfd-v", "second-stage")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
VANILLA_DATA = ("dataset", "teacher")
# `second_stage.first_stage: row:<id>` (or `evaluate.student: row:<id>`) names another row of the same study; the
# study engine resolves it to that row's finished run id before the run starts (a lone run cannot).
ROW_REF_PREFIX = "row:"
# The key naming the saved student an algorithm reads: a second stage's first stage, the student `evaluate` samples.
SAVED_STUDENT_KEYS = {"second-stage": "second_stage.first_stage", "evaluate": "evaluate.student"}


class ConfigError(ValueError):
    """A bad configuration: the message names the field, the bad value and what is allowed."""


@dataclass
class TeacherConfig:
    name: str = "digits"  # see sfd.teachers.TEACHERS
    # An EDM teacher's checkpoint file, or a Stable Diffusion teacher's diffusers folder or single checkpoint
    # file, overriding the named asset's location.
    path: str | None = None
    # Stable Diffusion: the diffusers folder whose configs and tokenizer go with a single checkpoint file (null:
    # sfd.teachers.registry.SD15_CONFIG_DIR).
    config: str | None = None
    # Text-conditioned teachers: the prompts file, a captions CSV (`text` column) or one prompt per line (null:
    # the MS-COCO 30k captions asset; a smoke run: the shipped smoke prompts).
    prompts: str | None = None


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
    # Trajectories per forward/backward (gradient accumulation within each student step); null: the whole batch
    # (of this process, under DDP). It changes memory, not the result (up to float rounding).
    micro_batch_size: int | None = None
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
    first_stage: str | None = None  # a saved student (see the module docstring)
    first_stage_step: int | None = None  # step condition of an SFD-v first stage (e.g. 7); None: plain SFD


@dataclass
class EvaluateConfig:
    """A student trained elsewhere, sampled as it is (algorithm `evaluate`)."""

    student: str | None = None  # a saved student (see the module docstring)
    num_steps_choices: list[int] | None = None  # a step-conditioned student: also evaluated at each of these N


@dataclass
class EvalConfig:
    metrics: list[str] | None = None  # None: the teacher's default metric
    num_samples: int | None = None  # None: sfd.metrics.evaluate.default_num_samples
    batch_size: int = 256
    gap_solver: str = "dpmpp3m"
    gap_nfe: int = 50
    # FID reference statistics (.npz: mu, sigma; PRDC also reads its `features`) overriding the dataset's
    # registered file (sfd.assets.FID_REFS); build one with `python -m sfd.metrics.reference build`.
    reference: str | None = None
    # clip_score: a local transformers CLIP folder (null: sfd.metrics.clip_score.default_clip_folder()).
    clip_model: str | None = None
    # torch.compile the sampled network (with the run's compile_mode). Off by default: at NFE 2 compiling the
    # eval-mode graph costs more than it saves over 50k samples (measure with `sfd.bench sample --compile`).
    compile: bool = False


@dataclass
class LogConfig:
    every: int = 50  # iterations between batched metric writes
    # MLflow's system metrics (CPU/GPU utilisation and memory) on the run (sfd.runner.system_metrics)
    system_metrics: bool = True


@dataclass
class RunConfig:
    name: str = "run"
    algorithm: str = "sfd"
    seed: int = 0
    device: str = "auto"
    # CPU threads of PyTorch and BLAS (sfd.threads): auto = one per process on a CPU ($OMP_NUM_THREADS if set),
    # which holds up when other processes compete for the cores; PyTorch's default on a GPU. Or a count >= 1.
    threads: int | str = "auto"
    # Processes (one device each) that train and evaluate this one run with DistributedDataParallel; 1 = no DDP.
    # experiments/run.py relaunches itself under torchrun for ddp > 1 (see the README's "One run on several GPUs").
    ddp: int = 1
    precision: str = "fp32"  # fp32 (TF32 off) | tf32 | bf16 (autocast, fp32 master weights); sfd.sampling
    # Speed options for image networks (see experiments/gpu_notes.md): results change only by rounding, but a
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
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def num_steps(self) -> int:
        """Student timestamps N: the student is an Euler sampler, so N = NFE + 2 with AFS, NFE + 1 without."""
        return self.student.nfe + (2 if self.student.afs else 1)

    @property
    def saved_student(self) -> tuple[str, str | None] | None:
        """(dotted key, value) of the saved student this run reads (SAVED_STUDENT_KEYS), else None."""
        key = SAVED_STUDENT_KEYS.get(self.algorithm)
        if key is None:
            return None
        section, name = key.split(".")
        return key, getattr(getattr(self, section), name)


def field_types(cls) -> dict[str, typing.Any]:
    """A schema class's field names and their (resolved) types."""
    return typing.get_type_hints(cls)


def all_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted field name of the schema, e.g. `student.t_min`."""
    cls = cls or RunConfig
    keys = []
    for name, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def is_section(dotted: str) -> bool:
    """Whether a dotted key names a section of the schema (`student`), not a field (`student.nfe`)."""
    cls = RunConfig
    for part in dotted.split("."):
        tp = field_types(cls).get(part)
        if tp is None or not dataclasses.is_dataclass(tp):
            return False
        cls = tp
    return True
