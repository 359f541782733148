"""A trained student's files, and the first stage a second stage continues from.

Every trained run logs its student as `student/student.safetensors` (the weights) and `student/sampling.json`
(`sampling_info`: what it needs to be sampled and continued). A second stage names its first stage by MLflow run
id or by such a folder; it is located (downloaded once per process), checked against the second stage's Euler
teacher grid, and loaded as a frozen network.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sfd.config import ROW_REF_PREFIX, ConfigError, RunConfig, grid_spec
from sfd.teachers import get_teacher
from sfd.tracking import RunLogger, default_tracking_uri, get_client, sqlite_path

STUDENT_FILE = "student.safetensors"
SAMPLING_FILE = "sampling.json"

_FIRST_STAGE_DOWNLOADS: dict[tuple[str, str], Path] = {}


def sampling_info(cfg: RunConfig, num_classes: int, step_condition: bool) -> dict:
    """What a saved student needs to be sampled and continued (`sampling.json`); the study engine builds the
    same dict for a row that has not run yet, to check a second stage chained to it."""
    grid = dataclasses.asdict(grid_spec(cfg))
    return {
        "algorithm": cfg.algorithm, "teacher": cfg.teacher.name, "teacher_path": cfg.teacher.path,
        "smoke": cfg.smoke, "solver": "euler", "nfe": cfg.student.nfe, "grid": grid,
        "step_condition": step_condition, "step": cfg.num_steps if step_condition else None,
        "num_steps_choices": cfg.sfdv.num_steps_choices if cfg.algorithm == "sfd-v" else None,
        "guidance": cfg.student.guidance, "num_classes": num_classes,
        "first_stage": cfg.second_stage.first_stage if cfg.algorithm == "second-stage" else None,
    }


def save_student(run: RunLogger, student: torch.nn.Module, info: dict) -> None:
    """Log the student's weights and its `sampling_info` as the run's `student/` artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(Path(tmp) / STUDENT_FILE))
        (Path(tmp) / SAMPLING_FILE).write_text(json.dumps(info, indent=2))
        run.log_artifact(Path(tmp) / STUDENT_FILE, "student")
        run.log_artifact(Path(tmp) / SAMPLING_FILE, "student")


def _student_folder(ref: str, path: Path) -> Path:
    for name in (STUDENT_FILE, SAMPLING_FILE):
        if not (path / name).is_file():
            raise ConfigError(f"second_stage.first_stage: {ref!r} has no {name}; point it at the student/ "
                              "folder a first-stage run logged, or give that run's MLflow id")
    return path


def _download_student(ref: str, uri: str) -> Path:
    """Run `ref`'s `student/` artifacts, downloaded into a new temporary folder."""
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
        return Path(client.download_artifacts(ref, "student", str(dst)))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"second_stage.first_stage: run {ref} has no student/ artifacts ({exc})") from None


def locate_first_stage(ref: str, tracking_uri: str | None = None) -> Path:
    """The folder holding a first-stage student's `student.safetensors` + `sampling.json`: `ref` is such a
    folder, the .safetensors file, or an MLflow run id (its `student/` artifacts are downloaded, once per
    process)."""
    if ref.startswith(ROW_REF_PREFIX):
        raise ConfigError(f"second_stage.first_stage: got {ref!r}, a row of a study; only a study resolves "
                          "it (to that row's finished run id); give a run id or a student/ folder here")
    path = Path(ref).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        path = path.parent
    if path.is_dir():
        return _student_folder(ref, path)
    uri = tracking_uri or default_tracking_uri()
    if (uri, ref) not in _FIRST_STAGE_DOWNLOADS:
        folder = _download_student(ref, uri)
        _FIRST_STAGE_DOWNLOADS[uri, ref] = _student_folder(str(folder), folder)
    return _FIRST_STAGE_DOWNLOADS[uri, ref]


def read_sampling_info(folder: Path) -> dict:
    """A located first stage's `sampling.json`."""
    return json.loads((folder / SAMPLING_FILE).read_text())


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
        raise ConfigError(f"second stage: the Euler teacher grid ((solver.m+1)(N-1)+1 = {expected} points) must be "
                          f"the first stage's own grid (N={n}, {g['schedule']}, t_min={g['t_min']}, "
                          f"t_max={g['t_max']}, rho={g['rho']}); differs: {mismatch or 'N'}")
    return n


def load_first_stage(folder: Path, device) -> tuple[torch.nn.Module, dict]:
    """The first-stage student network (eval mode, frozen) and its sampling settings."""
    info = read_sampling_info(folder)
    base = get_teacher(info["teacher"], path=info.get("teacher_path"), device=device, smoke=info.get("smoke", False))
    net = base.make_student(step_condition=info.get("step_condition", False))
    net.load_state_dict(load_file(str(folder / STUDENT_FILE), device=str(device)))
    return net.eval().requires_grad_(False), info
