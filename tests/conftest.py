"""Test-wide settings: one torch thread (tiny networks run faster and deterministically that way on the
2-core CI machine), offline MLflow."""
import os

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
torch.set_num_threads(1)


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """A private runs/ folder (MLflow + Optuna) for one test; the usual tracking URI variable is cleared."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("SFD_RUNS_DIR", str(runs))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return runs
