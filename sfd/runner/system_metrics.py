"""System metrics per run (CPU and GPU utilisation and memory, disk, network) with MLflow's system-metrics monitor:
a thread that samples psutil (and NVML, package nvidia-ml-py, on NVIDIA GPUs) and logs `system/...` metrics on the
run. Setting `log.system_metrics`: auto (the default) monitors runs on a CUDA device only; the small CPU runs of
the digits studies pay for the monitor's thread in wall time on a 2-core machine (see the README's measurement),
and a GPU run's CPU is mostly idle."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

SAMPLING_INTERVAL_S = 10.0  # MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
AUTO = "auto"


def monitors(setting: bool | str, device: torch.device) -> bool:
    """Whether a run with `log.system_metrics` = setting on `device` logs system metrics."""
    return device.type == "cuda" if setting == AUTO else bool(setting)


@contextlib.contextmanager
def system_metrics(run, on: bool) -> Iterator[None]:
    """Monitor while the block runs, when `on` and the run logs (rank 0 of a DDP run); the last samples are
    written when the block ends."""
    if not (on and run.active):
        yield
        return
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no INFO lines per start and stop
    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=SAMPLING_INTERVAL_S,
                                   tracking_uri=run.client.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
