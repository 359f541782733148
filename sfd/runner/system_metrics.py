"""System metrics per run (CPU and GPU utilisation and memory, disk, network) with MLflow's system-metrics monitor:
a thread that samples psutil (and NVML, package nvidia-ml-py, on NVIDIA GPUs) every 10 s and logs `system/...`
metrics on the run. On by default (`log.system_metrics: true`), on a CPU too: on the 2-core machine its cost on
`ablation_digits` was below the run-to-run noise of 1 % (the README's measurement), far from the 3 % that would
have turned it off for CPU studies."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

SAMPLING_INTERVAL_S = 10.0  # MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


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
