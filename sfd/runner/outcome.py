"""A run's outcome as a small JSON file, for whoever started the run as a separate process (torchrun, a batch
scheduler, a study's launcher), which cannot see `run_experiment`'s return value:

    {"status": "FINISHED", "run_id": "3f2a…", "error": null, "metrics": {"teacher_gap_mean": 0.041, …},
     "objective": [0.041], "ddp": 2}

Only rank 0 writes it (outside torchrun: the one process), replacing it atomically at each change, so a reader
never sees half a file: `RUNNING` with the run id as soon as the MLflow run exists, then the run's final MLflow
status `FINISHED`, `FAILED` or `KILLED` (`error` as in the run's `sfd.error` tag), or `INVALID` when bad input
(a ConfigError or a missing asset) stopped it before any run existed. `experiments/run.py --result-file PATH`
(default `$SFD_RESULT_FILE`) writes it; `read_outcome(PATH)` reads it.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from sfd.assets import AssetError
from sfd.config import ConfigError
from sfd.distributed import launched_rank, launched_world_size
from sfd.runner.run import RunResult

RESULT_FILE_ENV = "SFD_RESULT_FILE"
STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED", "INVALID")


class OutcomeFile:
    """The outcome file of this process's run; does nothing when `path` is None or this is not rank 0."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path).resolve() if path and launched_rank() == 0 else None
        self.state: dict[str, Any] = {"status": None, "run_id": None, "error": None, "metrics": {}, "objective": [],
                                      "ddp": launched_world_size()}

    def started(self, run_id: str) -> None:
        """The MLflow run exists (a `Tracker` `on_start` callback)."""
        self._write(status="RUNNING", run_id=run_id)

    def finished(self, result: RunResult) -> None:
        self._write(status=result.status, run_id=result.run_id, metrics=result.metrics,
                    objective=list(result.objective), ddp=result.config.ddp)

    @contextlib.contextmanager
    def reporting(self) -> Iterator["OutcomeFile"]:
        """Record an error that leaves the block (the MLflow run, if any, is already ended), then re-raise it."""
        try:
            yield self
        except (ConfigError, AssetError) as exc:
            self._write(status="FAILED" if self.state["run_id"] else "INVALID", error=_reason(exc))
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (sfd.signals.Terminated): the run ends KILLED
            self._write(status="KILLED", error=_reason(exc))
            raise
        except Exception as exc:
            self._write(status="FAILED", error=_reason(exc))
            raise

    def _write(self, **changes: Any) -> None:
        self.state.update(changes)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.path)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def read_outcome(path: str | os.PathLike) -> dict[str, Any]:
    """The outcome a run wrote to `path` (see the module docstring)."""
    data = json.loads(Path(path).read_text())
    if data.get("status") not in STATUSES:
        raise ValueError(f"{path}: not a run outcome (status {data.get('status')!r}; expected one of {STATUSES})")
    return data
