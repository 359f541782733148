"""A trained student as an MLflow 3 logged model of its run: a pyfunc that samples at the student's own NFE.

The model folder holds `MLmodel` (flavour python_function, a signature: seeds in, images out), and in `student/` the
run's `student.safetensors` and `sampling.json`. It is the pyfunc *loader-module* kind: MLflow loads it by
importing this module and calling `_load_pyfunc(<model>/student)`, which rebuilds the network from the project's
own code and reads the weights with safetensors. Nothing is unpickled (a `PythonModel` instance, and
`mlflow.pytorch.load_model`, would unpickle code stored with the model), so loading a model from a store you do
not control runs no code from it.

    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    images = model.predict(pd.DataFrame({"seed": [0, 1, 2]}))  # float32, (3, C, H, W), in [-1, 1]

A saved student is also found by its model (`models:/<model id>`, `models:/<name>/<version>`, `models:/<name>@best`)
or by a run URI (`runs:/<run id>`, `runs:/<run id>/student`) wherever a student path is accepted
(sfd.runner.students.locate_student).
"""
from __future__ import annotations

import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.entities import LoggedModelOutput
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import save_model
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from sfd.runner.student_files import load_student_folder
from sfd.sampling import GridSpec, generate

MODEL_NAME = "student_model"  # the logged model's name on its run: not an artifact folder of the run (MLflow lists
# `runs:/<run>/<name>` as the model's files too when a model has that name)
MODEL_TYPE = "sfd-student"
DATA_FOLDER = "student"  # inside the model folder: student.safetensors + sampling.json
URI_SCHEMES = ("models:/", "runs:/")


def signature(shape) -> ModelSignature:
    """Seeds in (one image each; `class_label` optional for a class-conditional student), images out, `device`
    as a parameter."""
    inputs = Schema([ColSpec("long", "seed"), ColSpec("long", "class_label", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *[int(d) for d in shape]))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("device", "string", "cpu")]))


def _requirements() -> list[str]:
    out = []
    for dist in ("sfd", "torch", "safetensors", "mlflow"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


def log_student_model(client, run_id: str, folder: Path, info: dict, shape) -> str:
    """Log the student whose `student.safetensors` + `sampling.json` are in `folder` as a logged model of run
    `run_id` (named `student_model`, its sampling settings as params); returns the model id."""
    run = client.get_run(run_id)
    params = {k: str(v) for k, v in info.items() if k != "grid" and v is not None}
    params.update({f"grid.{k}": str(v) for k, v in info["grid"].items()})
    model = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                       params=params, model_type=MODEL_TYPE)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model"
            mlflow_model = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                                 model_id=model.model_id)
            with warnings.catch_warnings():  # an input example would make MLflow load and run the model here
                warnings.filterwarnings("ignore", message=".*input example was not provided.*")
                save_model(str(path), loader_module=__name__, data_path=str(folder), signature=signature(shape),
                           pip_requirements=_requirements(), mlflow_model=mlflow_model,
                           metadata={"sfd": {"nfe": info["nfe"], "teacher": info["teacher"]}})
            client.log_model_artifacts(model.model_id, str(path))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def model_data_folder(model_dir: Path) -> Path:
    """The student folder inside a downloaded model folder (the pyfunc flavour's `data`, from its MLmodel)."""
    conf = yaml.safe_load((model_dir / "MLmodel").read_text())
    return model_dir / conf["flavors"]["python_function"]["data"]


class StudentPyfunc:
    """What `mlflow.pyfunc.load_model` wraps: the student, rebuilt on the CPU, sampled with its own grid."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.nets: dict[str, tuple] = {}

    def _net(self, device: str):
        if device not in self.nets:
            self.nets[device] = load_student_folder(self.folder, torch.device(device))
        return self.nets[device]

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        device = (params or {}).get("device") or "cpu"
        net, info, shape = self._net(device)
        labels = model_input["class_label"].tolist() if "class_label" in model_input else None
        if labels is not None and any(pd.isna(labels)):
            labels = None
        images, _ = generate(net, GridSpec(**info["grid"]), model_input["seed"].astype(int).tolist(), shape,
                             solver="euler", num_classes=info.get("num_classes") or 0, class_labels=labels,
                             guidance=info.get("guidance", 1.0), step=info.get("step"), device=device,
                             batch_size=max(1, len(model_input)))
        return images.cpu().numpy()


def _load_pyfunc(data_path: str) -> StudentPyfunc:
    """MLflow's loader-module entry point (`mlflow.pyfunc.load_model`)."""
    return StudentPyfunc(Path(data_path))
