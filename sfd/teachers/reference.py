"""Students distilled by the SFD reference implementation, read as data (no code in the file runs).

The reference (github.com/zju-pi/diff-sampler, ``sfd-main``) saves ``network-snapshot-NNNNNN.pkl`` =
``dict(model=net)``: ``net`` is its ``models.networks_edm.EDMPrecond`` (pickled by class name; a
persistence-format one, with recorded init kwargs, is read too) carrying ``training_kwargs`` (the loss kwargs it
trained with, which its sampler reads), ``sigma_min``, ``sigma_max`` and ``use_fp16``. Its networks always carry
the SFD-v layers. `read_reference_student` rebuilds the student as this project's ``EDMPrecond`` (the step layers
kept for an SFD-v student, checked and dropped for a plain one, which never uses them) and its sampling settings
as the reference's ``sample.py`` takes them from ``training_kwargs``: Euler with AFS as trained, the schedule,
rho, sigma_min and sigma_max recorded, ``num_steps`` recorded (an SFD-v student samples at any N).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfd.networks.edm import EDM_CONFIGS, EDMPrecond, architecture_mismatch, is_step_key
from sfd.sampling import GridSpec
from sfd.teachers.edm_pickle import (
    EDMPickleError, ModuleRecord, PersistentRecord, check_network_kwargs, check_tensors, collect_tensors,
    edm_state_from_record, network_from_tensors, read_edm_pickle,
)
from sfd.teachers.registry import TeacherError, teacher_spec

__all__ = ["REFERENCE_DATASETS", "SFDV_NUM_STEPS", "ReferenceStudent", "read_reference_student",
           "is_reference_snapshot"]

# The reference's dataset names: the SFD Lab teacher each distils and the EDM network its create_model builds.
REFERENCE_DATASETS = {
    "cifar10": ("cifar10-uncond", "edm-cifar10-32x32-uncond-vp"),
    "ffhq": ("ffhq64-uncond", "edm-ffhq-64x64-uncond-vp"),
    "afhqv2": ("afhqv2-64-uncond", "edm-afhqv2-64x64-uncond-vp"),
    "imagenet64": ("imagenet64-cond", "edm-imagenet-64x64-cond-adm"),
}
# The reference's teacher solvers by its names (train.py --sampler_tea), as SFD Lab names them.
REFERENCE_SOLVERS = {"euler": "euler", "heun": "heun", "dpm": "dpm2", "ipndm": "ipndm", "dpmpp": "dpmpp3m"}
# An SFD-v student is trained on N drawn from randint(4, 7) (training_loop.py): NFE 2-5 with AFS.
SFDV_NUM_STEPS = (4, 5, 6, 7)
# The schedules an EDM network's student samples with (`discrete` is spaced in a discrete-time teacher's levels).
EDM_SCHEDULES = ("polynomial", "logsnr", "time_uniform")
# What sampling reads from training_kwargs, with the type each must have.
_SAMPLING_KEYS = {"num_steps": int, "afs": bool, "schedule_type": str, "schedule_rho": (int, float),
                  "sigma_min": (int, float), "sigma_max": (int, float), "use_step_condition": bool,
                  "is_second_stage": bool, "dataset_name": str, "model_source": str}
# Attributes of the recorded EDMPrecond that are init kwargs of ours (the reference sets them after building).
_RECORDED_ATTRIBUTES = {"sigma_min": (int, float), "sigma_max": (int, float), "sigma_data": (int, float),
                        "use_fp16": bool}


@dataclass
class ReferenceStudent:
    """A reference-trained student: our network, its training_kwargs, and how it samples."""

    path: Path
    net: EDMPrecond
    training_kwargs: dict
    teacher: str  # the SFD Lab teacher its dataset_name names
    grid: GridSpec  # its sampling grid at the recorded num_steps
    step_condition: bool  # an SFD-v student (use_step_condition): it samples at any N, given as its step

    @property
    def nfe(self) -> int:
        return self.grid.num_steps - (2 if self.grid.afs else 1)

    @property
    def teacher_solver(self) -> str:
        sampler = self.training_kwargs.get("sampler_tea")
        return REFERENCE_SOLVERS.get(sampler, str(sampler))

    def describe(self) -> str:
        kind = "SFD-v (step-conditioned)" if self.step_condition else f"NFE {self.nfe}"
        stage = ", second stage" if self.training_kwargs["is_second_stage"] else ""
        return (f"reference-trained {kind}{stage} student of {self.teacher} ({self.grid.schedule}, "
                f"t_min {self.grid.t_min:g}, AFS {'on' if self.grid.afs else 'off'})")


def is_reference_snapshot(ref: str | os.PathLike | None) -> bool:
    """Whether a first-stage / student reference names a pickle file (the reference's snapshot format)."""
    return ref is not None and Path(ref).suffix == ".pkl"


def reference_teacher(dataset_name: str) -> str:
    """The SFD Lab teacher a reference `dataset_name` distils; a name that is one of our teachers names itself
    (a fork of the reference distilling another EDM network records the name it was given)."""
    if dataset_name in REFERENCE_DATASETS:
        return REFERENCE_DATASETS[dataset_name][0]
    try:
        teacher_spec(dataset_name)
    except TeacherError:
        raise EDMPickleError(f"its training_kwargs name dataset {dataset_name!r}, which is neither one of the "
                             f"reference's EDM datasets ({', '.join(REFERENCE_DATASETS)}) nor an SFD Lab teacher")
    return dataset_name


def _training_kwargs(state: dict) -> dict:
    kwargs = state.get("training_kwargs")
    if not isinstance(kwargs, dict):
        raise EDMPickleError("its network records no training_kwargs dict: not a student the SFD reference saved")
    for key, kind in _SAMPLING_KEYS.items():
        value = kwargs.get(key)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise EDMPickleError(f"its training_kwargs give {key}={value!r}; expected "
                                 f"{'a number' if isinstance(kind, tuple) else kind.__name__}")
    if kwargs["model_source"] != "edm":
        raise EDMPickleError(f"its training_kwargs give model_source={kwargs['model_source']!r}: only students of "
                             "EDM networks load here (latent / Stable Diffusion students do not)")
    return dict(kwargs)


def _grid(kwargs: dict) -> GridSpec:
    n, afs, schedule = kwargs["num_steps"], kwargs["afs"], kwargs["schedule_type"]
    t_min, t_max, rho = float(kwargs["sigma_min"]), float(kwargs["sigma_max"]), float(kwargs["schedule_rho"])
    if schedule not in EDM_SCHEDULES:
        raise EDMPickleError(f"its training_kwargs give schedule_type={schedule!r}; an EDM network's student "
                             f"samples with {', '.join(EDM_SCHEDULES)}")
    if not (n >= (3 if afs else 2) and 0 < t_min < t_max and rho > 0):
        raise EDMPickleError(f"its training_kwargs give an unusable grid (num_steps={n}, afs={afs}, "
                             f"sigma_min={t_min}, sigma_max={t_max}, schedule_rho={rho})")
    return GridSpec(num_steps=n, afs=afs, schedule=schedule, t_min=t_min, t_max=t_max, rho=rho)


def _find(record: Any, class_name: str, depth: int = 0) -> Any:
    """The first recorded module of a class in a module tree (depth-first, as registered)."""
    if not isinstance(record, (PersistentRecord, ModuleRecord)) or depth > 8:
        return None
    if record.class_name == class_name:
        return record
    children = record.state.get("_modules")
    for child in (children.values() if isinstance(children, dict) else ()):
        found = _find(child, class_name, depth + 1)
        if found is not None:
            return found
    return None


def _recorded_attributes(record: Any) -> dict:
    """What the recorded EDMPrecond stores that our init kwargs take: the reference sets sigma_min, sigma_max and
    use_fp16 after building the network; dropout and label_dropout live in its blocks and model."""
    state, out = record.state, {}
    for key, kind in _RECORDED_ATTRIBUTES.items():
        if isinstance(state.get(key), kind) and (kind is bool or not isinstance(state[key], bool)):
            out[key] = state[key]
    model = _find(record, "SongUNet") or _find(record, "DhariwalUNet")
    for module, key in ((_find(record, "UNetBlock"), "dropout"), (model, "label_dropout")):
        value = module.state.get(key) if module is not None else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
            out[key] = float(value)
    return out


def _architecture_of(record: Any, dataset_name: str, architecture: dict | None) -> dict:
    """EDMPrecond init kwargs for the recorded network: recorded ones (persistence format) checked against
    `architecture`; else `architecture` (the teacher's) or the EDM network the reference builds for the
    dataset; then what the record stores itself (sigma range, use_fp16, dropout)."""
    if isinstance(record, PersistentRecord):
        kwargs, _ = edm_state_from_record(record)
        diff = architecture_mismatch(architecture, kwargs) if architecture is not None else {}
        if diff:
            raise EDMPickleError("its recorded network is not the teacher's: " + ", ".join(
                f"{k}={got!r} (expected {want!r})" for k, (want, got) in diff.items()))
    else:
        if architecture is None:
            if dataset_name not in REFERENCE_DATASETS:
                raise EDMPickleError(f"its network is pickled by class name (no recorded init kwargs) and dataset "
                                     f"{dataset_name!r} is not one the reference builds; give the teacher's "
                                     "architecture")
            architecture = EDM_CONFIGS[REFERENCE_DATASETS[dataset_name][1]]
        kwargs = {k: v for k, v in architecture.items() if k not in ("step_condition", "step_init")}
    return check_network_kwargs({**kwargs, **_recorded_attributes(record)})


def read_reference_student(path: str | os.PathLike, *, teacher: str | None = None, architecture: dict | None = None,
                           device: str = "cpu") -> ReferenceStudent:
    """Rebuild a reference `network-snapshot-*.pkl` (see the module docstring). `teacher`: the SFD Lab teacher
    the student must have been distilled from (checked before anything is built); `architecture`: that
    teacher's EDMPrecond kwargs (needed when the snapshot's dataset is not one of the reference's EDM datasets,
    and checked against the recording otherwise). Every refusal is one EDMPickleError naming the file."""
    path = Path(path)
    data = read_edm_pickle(path)
    try:
        if "model" not in data:
            raise EDMPickleError(f"no entry 'model' (entries: {sorted(map(str, data))}); the SFD reference saves "
                                 "its students as dict(model=net)")
        record = data["model"]
        if not isinstance(record, (PersistentRecord, ModuleRecord)) or record.class_name != "EDMPrecond":
            raise EDMPickleError(f"its 'model' is a {getattr(record, 'class_name', type(record).__name__)}, not "
                                 "the reference's EDMPrecond")
        training = _training_kwargs(record.state)
        grid = _grid(training)
        distilled = reference_teacher(training["dataset_name"])
        if teacher is not None and distilled != teacher:
            raise EDMPickleError(f"it is a student of {distilled} (its training_kwargs say dataset "
                                 f"{training['dataset_name']!r}), not of {teacher}; set teacher.name={distilled}")
        kwargs = _architecture_of(record, training["dataset_name"], architecture)
        tensors = collect_tensors(record)
        step = training["use_step_condition"]
        has_step_layers = any(map(is_step_key, tensors))
        if step and not has_step_layers:
            raise EDMPickleError("its training_kwargs say use_step_condition, but it holds no step layers")
        if has_step_layers:  # the reference's layout, step layers included, whether or not they are used
            check_tensors({**kwargs, "step_condition": True}, tensors)
        if not step:  # unused by a plain student: dropped, so it is an ordinary EDM network
            tensors = {k: v for k, v in tensors.items() if not is_step_key(k)}
        net = network_from_tensors({**kwargs, "step_condition": step}, tensors)
    except EDMPickleError as exc:
        text = str(exc)
        raise EDMPickleError(text if text.startswith(str(path)) else f"{path}: {text}") from None
    return ReferenceStudent(path=path, net=net.to(device), training_kwargs=training, teacher=distilled, grid=grid,
                            step_condition=step)
