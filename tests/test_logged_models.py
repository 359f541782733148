"""What one digits run shows in MLflow beyond params and metrics (issue 22): its student as an MLflow 3 logged model
(a pyfunc that loads without unpickling anything and samples the same images as the run did), `models:/` and
`runs:/` URIs naming a saved student wherever a run id does (a second stage's first stage here), the files it read
as dataset inputs with their digests, and the image history of sample strips drawn during training."""
import hashlib
import json
import os
import pickle
import re
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
from sfd.metrics.digits import WEIGHTS_DIR as CLASSIFIER_DIR
from sfd.runner import run_experiment
from sfd.runner.inputs import DIGITS_DATA
from sfd.runner.strips import STRIP_SEEDS, strip_iterations
from sfd.teachers.embedded import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits_sfd.yaml"
IMAGE_FILE = r"images/samples\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png"
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

    # The image history: a strip of seeds 0-7 after iterations 0 and 1 (the last); the last is the trained student.
    images_dir = [a.path for a in client.list_artifacts(result.run_id, "images")]
    # MLflow's file names (client.log_image): images/<key>+step+<step>+timestamp+<ms>+<uuid>.png, and a .webp copy
    full = {int(m.group(1)): p for p in images_dir if (m := re.fullmatch(IMAGE_FILE, p))}
    assert sorted(full) == strip_iterations(2) == [0, 1] and len(images_dir) == 4
    assert strip_iterations(100) == [0, 12, 25, 38, 51, 64, 77, 90, 99]  # the first, every 13th, the last
    last = full[1]
    strip = np.asarray(Image.open(client.download_artifacts(result.run_id, last, str(tmp_path / "dl"))))
    row = np.asarray(_sample_grid(torch.from_numpy(images[:STRIP_SEEDS]).clamp(-1, 1)))  # 3x3 grid: 8 of 9 cells
    factor = strip.shape[0] // 10  # one 8-pixel sample plus a pixel of padding on each side
    for k in range(STRIP_SEEDS):
        cell = strip[::factor, ::factor][1:9, 1 + 9 * k:9 + 9 * k]
        r, c = divmod(k, 3)
        assert (cell == row[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c]).all(), k


def _inputs(client, run_id) -> dict:
    inputs = client.get_run(run_id).inputs.dataset_inputs
    return {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}


def test_a_run_logs_the_files_it_read_as_inputs_with_their_digests(tracked):
    """A vanilla digits run scored by fd_digits reads its teacher's weights, the digits data and the digits
    classifier: each is an input whose digest is its SHA-256's first 32 hex digits (the whole hash in the profile),
    tagged with what the run used it for. An SFD run scored by the teacher gap reads the teacher alone."""
    client = MlflowClient(tracked)
    sfd_run = run_experiment(load_config(DIGITS, TINY), tracker=T.Tracker("inputs"))
    assert set(_inputs(client, sfd_run.run_id)) == {"teacher"}
    result = run_experiment(load_config(DIGITS, TINY + ["algorithm=vanilla", "eval.metrics=[fd_digits]"]),
                            tracker=T.Tracker("inputs"))
    by_context = _inputs(client, result.run_id)
    assert set(by_context) == {"teacher", "data", "metric"}
    for context, path in (("teacher", WEIGHTS_DIR / "digits.safetensors"), ("data", DIGITS_DATA),
                          ("metric", CLASSIFIER_DIR / "digits_classifier.safetensors")):
        dataset, sha = by_context[context], hashlib.sha256(path.read_bytes()).hexdigest()
        assert dataset.digest == sha[:32] and json.loads(dataset.profile) == {"sha256": sha, "bytes": path.stat().st_size}
        assert json.loads(dataset.source) == {"uri": path.resolve().as_uri()} and dataset.source_type == "local"


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


def test_system_metrics_are_logged_unless_turned_off(tracked, monkeypatch):
    """MLflow's system/ metrics are on the run by default, on a CPU too; log.system_metrics: false leaves them off."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # several samples within a tiny run
    client = MlflowClient(tracked)
    on = run_experiment(load_config(DIGITS, TINY), tracker=T.Tracker("system"))
    metrics = client.get_run(on.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert len(client.get_metric_history(on.run_id, "system/cpu_utilization_percentage")) >= 2
    off = run_experiment(load_config(DIGITS, TINY + ["log.system_metrics=false"]), tracker=T.Tracker("system"))
    assert not [k for k in client.get_run(off.run_id).data.metrics if k.startswith("system/")]
    with pytest.raises(ConfigError, match="log.system_metrics"):
        load_config(DIGITS, TINY + ["log.system_metrics=sometimes"])
