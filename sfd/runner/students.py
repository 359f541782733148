"""Saved students: what a training run writes, and finding and reading one wherever it is.

Every trained run logs its student as `student/student.safetensors` (the weights) and `student/sampling.json`
(`sampling_info`: what it needs to be sampled and continued). A run that reads a saved student (a second stage's
first stage, `second_stage.first_stage`; the student `algorithm: evaluate` samples, `evaluate.student`) names it
by an MLflow run id, a run or model URI (`runs:/<run id>`, `models:/<model id>`, `models:/<name>@<alias>`: every
trained student is also a logged model of its run, sfd.runner.logged_model), a `student/` folder or its .safetensors
file, or a `network-snapshot-NNNNNN.pkl` the SFD reference implementation saved. `saved_student_info` says what it is, as the same dict for both kinds (a reference
snapshot's from its training_kwargs, read as its `sample.py` reads them), and `load_saved_student` rebuilds it as a
frozen network. A run id's files are downloaded, and a snapshot read, once per process (a study's checks and its
runs share them). Every refusal is a ConfigError naming the config key.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from mlflow.artifacts import download_artifacts
from safetensors.torch import save_file

from sfd.config import ROW_REF_PREFIX, ConfigError, RunConfig, grid_spec
from sfd.runner.logged_model import URI_SCHEMES, log_student_model, model_data_folder
from sfd.runner.student_files import SAMPLING_FILE, STUDENT_FILE, load_student_folder, read_sampling_info
from sfd.teachers.edm_pickle import EDMPickleError
from sfd.teachers.reference import SFDV_NUM_STEPS, ReferenceStudent, is_reference_snapshot, read_reference_student
from sfd.teachers.registry import teacher_architecture
from sfd.tracking import RunLogger, default_tracking_uri, get_client, sqlite_path

REFERENCE_ALGORITHM = "reference"  # `algorithm` in the info of a student the SFD reference implementation trained

_DOWNLOADS: dict[tuple[str, str], Path] = {}
_SNAPSHOTS: dict[tuple, ReferenceStudent] = {}


# ----- what a training run writes ---------------------------------------------------------------------------

def sampling_info(cfg: RunConfig, num_classes: int, step_condition: bool) -> dict:
    """What a saved student needs to be sampled and continued (`sampling.json`); the study engine builds the
    same dict for a row that has not run yet, to check a row chained to it."""
    grid = dataclasses.asdict(grid_spec(cfg))
    return {
        "algorithm": cfg.algorithm, "teacher": cfg.teacher.name, "teacher_path": cfg.teacher.path,
        "teacher_config": cfg.teacher.config,
        "smoke": cfg.smoke, "solver": "euler", "nfe": cfg.student.nfe, "grid": grid,
        "step_condition": step_condition, "step": cfg.num_steps if step_condition else None,
        "num_steps_choices": cfg.sfdv.num_steps_choices if cfg.algorithm == "sfd-v" else None,
        "guidance": cfg.student.guidance, "num_classes": num_classes,
        "first_stage": cfg.second_stage.first_stage if cfg.algorithm == "second-stage" else None,
    }


def save_student(run: RunLogger, student: torch.nn.Module, info: dict, shape=None) -> str | None:
    """Log the student's weights and its `sampling_info` as the run's `student/` artifacts and, given the shape
    of one sample, as the run's logged model (sfd.runner.logged_model); returns the model id."""
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(Path(tmp) / STUDENT_FILE))
        (Path(tmp) / SAMPLING_FILE).write_text(json.dumps(info, indent=2))
        run.log_artifact(Path(tmp) / STUDENT_FILE, "student")
        run.log_artifact(Path(tmp) / SAMPLING_FILE, "student")
        return None if shape is None else log_student_model(run.client, run.run_id, Path(tmp), info, shape)


# ----- finding one ------------------------------------------------------------------------------------------

def _student_folder(key: str, ref: str, path: Path) -> Path:
    for name in (STUDENT_FILE, SAMPLING_FILE):
        if not (path / name).is_file():
            raise ConfigError(f"{key}: {ref!r} has no {name}; point it at the student/ folder a training run "
                              "logged, or give that run's MLflow id")
    return path


def _download_student(key: str, ref: str, uri: str) -> Path:
    """Run `ref`'s `student/` artifacts, downloaded into a new temporary folder."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # do not create an empty store just to look a run up
        raise ConfigError(f"{key}: got {ref!r}; neither a folder / .safetensors / .pkl file nor a run id (there is "
                          f"no tracking store at {db})")
    client = get_client(uri)
    try:
        client.get_run(ref)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types for unknown ids
        raise ConfigError(f"{key}: got {ref!r}; neither a folder / .safetensors / .pkl file nor a run id in the "
                          f"tracking store {client.tracking_uri}") from None
    dst = Path(tempfile.mkdtemp(prefix="sfd-student-"))
    try:
        return Path(client.download_artifacts(ref, "student", str(dst)))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{key}: run {ref} has no student/ artifacts ({exc})") from None


def _download_uri(key: str, ref: str, uri: str) -> Path:
    """The student folder of a `models:/` URI (the logged model's data folder) or a `runs:/` URI (the run's
    `student/` artifacts, or the folder the URI names), downloaded into a new temporary folder."""
    run_uri = ref.startswith("runs:/")
    if run_uri and len(ref.removeprefix("runs:/").strip("/").split("/")) == 1:
        ref = ref.rstrip("/") + "/student"
    dst = tempfile.mkdtemp(prefix="sfd-student-")
    try:
        path = Path(download_artifacts(artifact_uri=ref, dst_path=dst, tracking_uri=uri, registry_uri=uri))
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types for unknown models and runs
        raise ConfigError(f"{key}: {ref!r} cannot be read from the tracking store {uri} "
                          f"({' '.join(str(exc).split())[:300]})") from None
    if not run_uri and (path / "MLmodel").is_file():
        return model_data_folder(path)
    return path


def locate_student(key: str, ref: str, tracking_uri: str | None = None) -> Path:
    """The folder holding a student's `student.safetensors` + `sampling.json`: `ref` (the value of config key
    `key`) is such a folder, the .safetensors file, an MLflow run id (its `student/` artifacts), or a `models:/` or
    `runs:/` URI (downloaded once per process)."""
    if ref.startswith(URI_SCHEMES):
        uri = tracking_uri or default_tracking_uri()
        if (uri, ref) not in _DOWNLOADS:
            folder = _download_uri(key, ref, uri)
            _DOWNLOADS[uri, ref] = _student_folder(key, str(folder), folder)
        return _DOWNLOADS[uri, ref]
    if ref.startswith(ROW_REF_PREFIX):
        raise ConfigError(f"{key}: got {ref!r}, a row of a study; only a study resolves it (to that row's finished "
                          "run id); give a run id or a student/ folder here")
    path = Path(ref).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        path = path.parent
    if path.is_dir():
        return _student_folder(key, ref, path)
    uri = tracking_uri or default_tracking_uri()
    if (uri, ref) not in _DOWNLOADS:
        folder = _download_student(key, ref, uri)
        _DOWNLOADS[uri, ref] = _student_folder(key, str(folder), folder)
    return _DOWNLOADS[uri, ref]


# ----- a student the SFD reference implementation trained ----------------------------------------------------

def load_reference(key: str, path: str, teacher: str) -> ReferenceStudent:
    """The snapshot at `path`, a student of `teacher` read with its architecture, kept for the next call on the
    same file (one file per process). A refusal (a student of another teacher too) is a ConfigError naming `key`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: got {path!r}; the file does not exist")
    stat = file.stat()
    cache_key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size, teacher)
    if cache_key not in _SNAPSHOTS:
        try:
            student = read_reference_student(file, teacher=teacher, architecture=teacher_architecture(teacher))
        except EDMPickleError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        _SNAPSHOTS.clear()
        _SNAPSHOTS[cache_key] = student
    return _SNAPSHOTS[cache_key]


def reference_info(student: ReferenceStudent, smoke: bool) -> dict:
    """A reference snapshot's `sampling_info`, read from its training_kwargs (`training_kwargs` kept as well)."""
    return {
        "algorithm": REFERENCE_ALGORITHM, "teacher": student.teacher, "teacher_path": None,
        "smoke": smoke,  # a reference student is real in a smoke run too: nothing to compare
        "solver": "euler", "nfe": student.nfe, "grid": dataclasses.asdict(student.grid),
        "step_condition": student.step_condition, "step": None,
        "num_steps_choices": list(SFDV_NUM_STEPS) if student.step_condition else None,
        "guidance": 1.0, "num_classes": student.net.label_dim, "first_stage": str(student.path),
        "training_kwargs": student.training_kwargs,
    }


# ----- what a run reads -------------------------------------------------------------------------------------

def saved_student_info(cfg: RunConfig, tracking_uri: str | None = None) -> dict:
    """The `sampling_info` of the saved student `cfg` reads (see `RunConfig.saved_student`)."""
    key, ref = cfg.saved_student
    if is_reference_snapshot(ref):
        return reference_info(load_reference(key, ref, cfg.teacher.name), cfg.smoke)
    return read_sampling_info(locate_student(key, ref, tracking_uri))


def load_saved_student(cfg: RunConfig, device, tracking_uri: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The saved student `cfg` reads, as a network (eval mode, frozen, a copy of its own), and its info."""
    key, ref = cfg.saved_student
    if is_reference_snapshot(ref):
        student = load_reference(key, ref, cfg.teacher.name)
        net, info = copy.deepcopy(student.net), reference_info(student, cfg.smoke)
    else:
        net, info, _ = load_student_folder(locate_student(key, ref, tracking_uri), device,
                                           prompts=cfg.teacher.prompts)
    return net.to(device).eval().requires_grad_(False), info


def describe(info: dict) -> str:
    """A saved student in a few words, e.g. `the reference-trained student of digits (NFE 3)`."""
    steps = "step-conditioned, SFD-v" if info.get("step_condition") else f"NFE {info['nfe']}"
    return f"the {info.get('algorithm', 'saved')}-trained student of {info['teacher']} ({steps})"


def check_same_teacher(key: str, cfg: RunConfig, info: dict) -> None:
    """A saved student's teacher (and smoke mode) must be the run's: its network, shapes, classes and metrics are
    its own teacher's."""
    for name, ours in (("teacher", cfg.teacher.name), ("smoke", cfg.smoke)):
        theirs = info.get(name, False if name == "smoke" else None)
        if theirs != ours:
            raise ConfigError(f"{key}: the saved student was distilled with {name}={theirs!r}, this run has "
                              f"{name}={ours!r}; set {'teacher.name' if name == 'teacher' else 'the same smoke mode'} "
                              "to match")


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_evaluated_student(cfg: RunConfig, info: dict) -> None:
    """algorithm=evaluate: `student.*` must state the grid the saved student samples with (its sampling.json, or a
    reference snapshot's training_kwargs), so the logged config says how it was evaluated; a step-conditioned
    student samples at any N it was trained on. `student.guidance` is free: guidance is a sampling setting."""
    check_same_teacher("evaluate.student", cfg, info)
    g, step_cond = info["grid"], bool(info.get("step_condition"))
    expected = {k: g[k] for k in ("afs", "schedule", "t_min", "t_max", "rho")}
    if not step_cond:
        expected["nfe"] = info["nfe"]
    diff = {k: v for k, v in expected.items() if getattr(cfg.student, k) != v}
    record = "training_kwargs" if info.get("algorithm") == REFERENCE_ALGORITHM else SAMPLING_FILE
    if diff:
        raise ConfigError(f"evaluate.student: {describe(info)} samples with "
                          + ", ".join(f"student.{k}={_yaml(v)}" for k, v in expected.items())
                          + f" (its {record}); this run differs in {', '.join(diff)}: set "
                          + " ".join(f"student.{k}={_yaml(v)}" for k, v in diff.items()))
    choices = cfg.evaluate.num_steps_choices
    if not step_cond and choices:
        raise ConfigError(f"evaluate.num_steps_choices: got {choices}; {describe(info)} is not step-conditioned, "
                          "so it samples at its own N only (leave it null)")
    trained = info.get("num_steps_choices") or [g["num_steps"]]
    outside = [n for n in [cfg.num_steps, *(choices or [])] if n not in trained]
    if step_cond and outside:
        raise ConfigError(f"student.nfe / evaluate.num_steps_choices: N {outside} asked; {describe(info)} was "
                          f"trained on N in {trained} only (N = NFE + 2 with AFS)")
