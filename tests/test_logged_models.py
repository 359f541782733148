"""Students as MLflow 3 logged models (issue 22): a digits run logs its student as a pyfunc that loads without
unpickling anything and samples the same images as the run did; `models:/` and `runs:/` URIs name a saved student
wherever a run id does (a second stage's first stage here)."""
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import cloudpickle
import mlflow
from mlflow import MlflowClient
from PIL import Image
from study_runner import DIGITS_TINY

from sfd import tracking as T
from sfd.config import ConfigError, load_config
from sfd.metrics.evaluate import _sample_grid
from sfd.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits_sfd.yaml"
TINY = [f"{k}={v}" for k, v in DIGITS_TINY.items()] + ["eval.metrics=[teacher_gap]"]


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """A private store, named by MLFLOW_TRACKING_URI so that `mlflow.pyfunc.load_model` reads it too."""
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("SFD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a logged student must load without unpickling")

    for module in (pickle, cloudpickle):
        monkeypatch.setattr(module, "load", refuse)
        monkeypatch.setattr(module, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_a_digits_run_logs_a_pyfunc_student_that_samples_the_runs_images(tracked, tmp_path, monkeypatch):
    result = run_experiment(load_config(DIGITS, TINY), tracker=T.Tracker("models"))
    client = MlflowClient(tracked)
    run = client.get_run(result.run_id)
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "student_model" and model.source_run_id == result.run_id and model.status.to_proto() == 2  # READY
    assert model.params["nfe"] == "2" and model.params["grid.num_steps"] == "4" and model.params["teacher"] == "digits"

    with monkeypatch.context() as patch:
        _no_unpickling(patch)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
        images = pyfunc.predict(pd.DataFrame({"seed": np.arange(16)}))
    assert pyfunc.metadata.signature.inputs.input_names() == ["seed", "class_label"]
    assert images.shape == (16, 1, 8, 8) and images.dtype == np.float32

    # The run's samples.png is seeds 0-15 on the student's grid, enlarged by a whole factor: the model gives the
    # same pixels (the same network and noise, on the same CPU).
    png = np.asarray(Image.open(client.download_artifacts(result.run_id, "samples.png", str(tmp_path / "dl"))))
    ours = np.asarray(_sample_grid(torch.from_numpy(images).clamp(-1, 1)))
    factor = png.shape[0] // ours.shape[0]
    assert factor > 1 and (png[::factor, ::factor] == ours).all()
    assert not (ours == 0).all()


def test_a_second_stage_starts_from_a_models_uri_and_a_runs_uri(tracked):
    first = run_experiment(load_config(DIGITS, TINY + ["student.nfe=5"]), tracker=T.Tracker("stages"))
    client = MlflowClient(tracked)
    (output,) = client.get_run(first.run_id).outputs.model_outputs
    stage2 = TINY + ["algorithm=second-stage", "solver.name=euler", "solver.m=2", "student.nfe=1"]
    by_id = run_experiment(load_config(DIGITS, stage2 + [f"second_stage.first_stage={first.run_id}"]),
                           tracker=T.Tracker("stages"))
    outcomes = {}
    for ref in (f"models:/{output.model_id}", f"runs:/{first.run_id}", f"runs:/{first.run_id}/student"):
        second = run_experiment(load_config(DIGITS, stage2 + [f"second_stage.first_stage={ref}"]),
                                tracker=T.Tracker("stages"))
        run = client.get_run(second.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["sfd.first_stage"] == ref
        outcomes[ref] = second.metrics["teacher_gap_mean"]
    # the same first stage, found three ways, distils to the same second stage as from its run id
    assert set(outcomes.values()) == {by_id.metrics["teacher_gap_mean"]}

    with pytest.raises(ConfigError, match="second_stage.first_stage: 'models:/m-0000' cannot be read"):
        run_experiment(load_config(DIGITS, stage2 + ["second_stage.first_stage=models:/m-0000"]),
                       tracker=T.Tracker("stages"))
