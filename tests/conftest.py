"""Test-wide settings: one torch thread (tiny networks run faster and deterministically that way on the
2-core CI machine), offline MLflow."""
import os

import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
torch.set_num_threads(1)
