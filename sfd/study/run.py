"""Run a study: check everything, then create or resume it (its MLflow parent run and Optuna study), recover
what a dead process left, queue what is left, and launch the trials (serially, or one worker per device)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import optuna

from sfd import tracking as T
from sfd.progress import say as say_line

from .devices import run_on
from .lock import study_home, study_lock
from .loop import TrialLoop, interrupt_stored, make_sampler, recover_interrupted
from .parent import describe_experiment, end_invocation, log_study_params, log_study_summary
from .plan import plan_trials, trial_limit, unlisted_queue
from .preflight import CheckedStudy, check_everything
from .serial import run_here
from .spec import StudySpec


@dataclass
class StudyOutcome:
    name: str
    experiment: str
    parent_run_id: str
    optuna_study: str
    storage: str
    tracking_uri: str
    ran: int  # trials that ended (complete or failed) in this invocation
    failed: list[tuple[int, str]]  # (trial number, reason) of the trials that failed in this invocation
    skipped: dict[str, str]
    seconds: float  # this invocation's wall time, tracked on the parent run as invocation/wall_s
    spec: StudySpec
    study: optuna.Study


@dataclass
class _Opened:
    """A study's stores once set up: its MLflow parent run, and its Optuna study and storage."""
    client: Any
    parent_id: str
    storage: optuna.storages.BaseStorage
    study: optuna.Study


def run_study(name_or_path: str, *, smoke: bool = False, storage: str | None = None,
              tracking_uri: str | None = None, n_trials: int | None = None, retry_failed: bool = False,
              quiet: bool = False, seeds: list[int] | None = None, devices: list[str] | None = None,
              progress: bool = False) -> StudyOutcome:
    """Check everything (nothing is created before), then create or resume the study and run what is left.

    Finished trials are kept; trials left RUNNING by a dead process are marked FAILED (their MLflow runs too)
    and, like trials stopped by Ctrl-C or SIGTERM, run again; failed trials stay failed unless `retry_failed`.
    `n_trials` caps the trials started now; `seeds` runs a table study's rows once per seed, as a study of its
    own; `devices` runs up to one trial per entry at once, each in a worker process (`["auto"]`: see
    `sfd.study.workers.auto_devices`; None: one at a time in this process). What happens goes to stdout, one line
    each, unless `quiet`; `progress` adds which trial starts and bars over its training and evaluation."""
    start = time.perf_counter()
    checked = check_everything(name_or_path, smoke, storage, tracking_uri, n_trials, seeds, devices, retry_failed)
    if checked.missing is not None:
        raise checked.missing
    spec = checked.spec
    if checked.spec_text is not None:  # the replicated study's own YAML: logged on its parent run, read by the report
        spec.path = study_home(checked.storage_url) / "studies" / f"{spec.name}.yaml"
        spec.path.parent.mkdir(parents=True, exist_ok=True)
        spec.path.write_text(checked.spec_text)
    say = (lambda *a: None) if quiet else say_line
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with study_lock(spec.experiment(smoke), checked.storage_url):  # one live process per study (see study_lock)
        T.ensure_sqlite_parent(checked.storage_url)
        opened = _open_study(checked, smoke)
        todo = _resume(checked, opened, smoke, n_trials, retry_failed, say)
        loop = TrialLoop(spec, opened.study, smoke, spec.experiment(smoke), checked.tracking_uri, opened.parent_id,
                         say, progress=progress and not quiet)
        seconds = _run_trials(loop, checked.devices, todo, opened, start)
    return StudyOutcome(name=spec.name, experiment=spec.experiment(smoke), parent_run_id=opened.parent_id,
                        optuna_study=spec.experiment(smoke), storage=checked.storage_url,
                        tracking_uri=checked.tracking_uri, ran=loop.ran, failed=loop.failed, skipped=checked.skipped,
                        seconds=seconds, spec=spec, study=opened.study)


def _parent_tags(checked: CheckedStudy, smoke: bool) -> dict[str, str]:
    """The tags of the study's MLflow parent run (set again on every invocation)."""
    spec, skipped = checked.spec, checked.skipped
    return {T.TAG_KIND: spec.kind, T.TAG_OPTUNA_STUDY: spec.experiment(smoke),
            T.TAG_OPTUNA_STORAGE: checked.storage_url, T.TAG_SMOKE: str(smoke).lower(),
            T.TAG_OBJECTIVE: ",".join(spec.metrics), T.TAG_DIRECTIONS: ",".join(spec.directions),
            T.TAG_SAMPLER: f"{spec.sampler}(seed={spec.seed})", T.TAG_SPEC_PATH: str(spec.path),
            T.TAG_NOTE: spec.description,
            T.TAG_DEVICES: " ".join(checked.devices) if checked.devices else "this process",
            **({T.TAG_SKIPPED_ROWS: "; ".join(f"{k}: {v}" for k, v in skipped.items())} if skipped else {})}


def _open_study(checked: CheckedStudy, smoke: bool) -> _Opened:
    """The study's MLflow parent run (its YAML logged on it) and its Optuna study, created or found, linked both
    ways (parent run tags, study user attributes)."""
    spec, experiment = checked.spec, checked.spec.experiment(smoke)
    client = T.get_client(checked.tracking_uri)
    parent_id = T.study_parent_run(client, experiment, spec.name, _parent_tags(checked, smoke))
    client.log_artifact(parent_id, str(spec.path))
    log_study_params(client, parent_id, spec, smoke)
    describe_experiment(client, experiment, spec, smoke)
    storage = optuna.storages.get_storage(checked.storage_url)
    sampler = make_sampler(spec, parallel=bool(checked.devices) and len(checked.devices) > 1)
    study = optuna.create_study(study_name=experiment, storage=storage, sampler=sampler,
                                directions=spec.directions, load_if_exists=True)
    for key, value in {"mlflow_parent_run_id": parent_id, "mlflow_experiment": experiment,
                       "mlflow_tracking_uri": checked.tracking_uri, "sfd_study": spec.name, "kind": spec.kind,
                       "spec_path": str(spec.path), "objective_metrics": spec.metrics, "smoke": smoke}.items():
        study.set_user_attr(key, value)
    return _Opened(client, parent_id, storage, study)


def _resume(checked: CheckedStudy, opened: _Opened, smoke: bool, n_trials: int | None, retry_failed: bool,
            say) -> int:
    """Recover what a dead process left (its trials and runs end FAILED, interrupted), take the queued rows the
    YAML no longer runs off the queue, enqueue what is left and return how many trials to run now."""
    spec, study, skipped = checked.spec, opened.study, checked.skipped
    stale = recover_interrupted(study, opened.storage, opened.client)
    for trial, reason in unlisted_queue(spec, study.get_trials(deepcopy=False), skipped):
        interrupt_stored(opened.storage, study.study_name, trial, reason)  # queued again if the row comes back
    T.fail_stale_children(opened.client, opened.parent_id, spec.experiment(smoke))
    todo = plan_trials(spec, study, retry_failed, skipped, trial_limit(spec, smoke, n_trials))
    if stale:
        say(f"resumed: {len(stale)} interrupted trial(s) marked FAILED and queued again")
    for row_id, reason in skipped.items():
        say(f"skipped row {row_id}: {reason}")
    say(f"study {spec.name}{' (smoke)' if smoke else ''}: {todo} trial(s) to run; MLflow {checked.tracking_uri} "
        f"experiment {spec.experiment(smoke)!r}, Optuna {checked.storage_url} study {study.study_name!r}")
    return todo


def _run_trials(loop: TrialLoop, devices: list[str] | None, todo: int, opened: _Opened, start: float) -> float:
    """Launch the trials; the parent run then gets the study's best row and its status (`sfd.study.parent`:
    RUNNING while trials are queued, KILLED after a stop, FAILED after an error). Returns the invocation's wall
    time (tracked on the parent run with the number of trials that ended)."""
    stopped = False
    seconds = error = None
    try:
        if todo and devices:
            run_on(loop, devices, todo)
        elif todo:
            run_here(loop, todo)
        seconds = time.perf_counter() - start
        opened.client.log_metric(opened.parent_id, "invocation/wall_s", seconds)
        opened.client.log_metric(opened.parent_id, "invocation/trials_run", loop.ran)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the trial's run ended KILLED and the trial FAIL (interrupted)
        stopped = True
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        log_study_summary(opened.client, opened.parent_id, loop.spec, opened.study, loop.smoke, seconds)
        end_invocation(opened.client, opened.parent_id, opened.study, stopped=stopped, error=error)
    return seconds
