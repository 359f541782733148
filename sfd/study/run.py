"""Run a study: check everything, then create or resume it (its Optuna study and MLflow parent run, set up once
under the study's set-up lock), settle what dead processes left, queue what is left, and run trials (serially, or
one worker per device) until none is left to claim. Many processes may run one PostgreSQL study at once."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import optuna

from sfd import tracking as T
from sfd.progress import say as say_line
from sfd.storelock import store_identity, without_password

from .devices import run_on
from .lock import setup_lock, shared, study_home, study_lock
from .loop import Stores, TrialLoop, make_sampler
from .parent import describe_experiment, end_invocation, log_study_params, log_study_summary
from .peers import Heartbeats, open_storage
from .plan import trial_limit, trials_left
from .preflight import CheckedStudy, check_everything
from .serial import run_here
from .spec import StudySpec

MAX_POLL_S = 5.0  # how often a process with nothing to claim looks at the study again while others run trials


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
    others_running: int = 0  # trials other processes were still running when this one ended


def run_study(name_or_path: str, *, smoke: bool = False, storage: str | None = None,
              tracking_uri: str | None = None, n_trials: int | None = None, retry_failed: bool = False,
              quiet: bool = False, seeds: list[int] | None = None, devices: list[str] | None = None,
              heartbeat_s: int | None = None, progress: bool = False) -> StudyOutcome:
    """Check everything (nothing is created before), then create or resume the study and run what is left.

    Finished trials are kept; a trial whose process died (on sqlite: any trial left RUNNING, since the study lock
    proves no other process runs it; on PostgreSQL: one whose heartbeat is older than 3 heartbeat intervals) has its
    finished run adopted, or else its run marked FAILED and its row run again, as are trials stopped by Ctrl-C or
    SIGTERM; failed trials stay failed unless `retry_failed`. `n_trials` caps the trials this process starts;
    `seeds` runs a table study's rows once per seed, as a study of its own; `devices` runs up to one trial per
    entry at once, each in a worker process (`["auto"]`: see `sfd.study.workers.auto_devices`; None: one at a time
    in this process). `heartbeat_s` (default HEARTBEAT_S) is the interval at which each running trial records a
    heartbeat; a study keeps the one it was created with, so that every peer judges the others' heartbeats alike.
    What happens goes to stdout, one line each, unless `quiet`; `progress` adds which trial starts and bars over
    its training and evaluation."""
    start = time.perf_counter()
    checked = check_everything(name_or_path, smoke, storage, tracking_uri, n_trials, seeds, devices, retry_failed,
                               heartbeat_s)
    if checked.missing is not None:
        raise checked.missing
    spec = checked.spec
    say = (lambda *a: None) if quiet else say_line
    heartbeat_s = checked.heartbeat_s
    if checked.heartbeat_ignored:
        say(f"heartbeat: every {heartbeat_s}s, the study's own since it was created (every peer uses it)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with study_lock(spec.experiment(smoke), checked.storage_url):  # sqlite: one live process per study
        _write_seeds_study(checked)
        T.ensure_sqlite_parent(checked.storage_url)
        stores = _open_study(checked, smoke, heartbeat_s)
        with Heartbeats(stores.storage, heartbeat_s) as heartbeats:
            loop = TrialLoop(spec, stores, smoke, say, heartbeats=heartbeats, retry_failed=retry_failed,
                             limit=trial_limit(spec, smoke, n_trials), skipped=checked.skipped,
                             poll_s=min(MAX_POLL_S, heartbeat_s), progress=progress and not quiet)
            _resume(checked, loop, smoke, say)
            seconds, others = _run_trials(loop, checked.devices, stores, start)
    return StudyOutcome(name=spec.name, experiment=spec.experiment(smoke), parent_run_id=stores.parent_id,
                        optuna_study=spec.experiment(smoke), storage=checked.storage_url,
                        tracking_uri=checked.tracking_uri, ran=loop.ran, failed=loop.failed, skipped=checked.skipped,
                        seconds=seconds, spec=spec, study=stores.study, others_running=others)


def _write_seeds_study(checked: CheckedStudy) -> None:
    """The replicated study's own YAML (logged on its parent run, read by the report), written whole (peers on one
    machine may write it at once) and only by a process the study lock let in."""
    if checked.spec_text is None:
        return
    spec = checked.spec
    spec.path = study_home(checked.storage_url) / "studies" / f"{spec.name}.yaml"
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    partial = spec.path.with_name(f".{spec.path.name}.{os.getpid()}")
    partial.write_text(checked.spec_text)
    partial.replace(spec.path)


def _parent_tags(checked: CheckedStudy, smoke: bool) -> dict[str, str]:
    """The tags of the study's MLflow parent run (set again on every invocation)."""
    spec, skipped = checked.spec, checked.skipped
    return {T.TAG_KIND: spec.kind, T.TAG_OPTUNA_STUDY: spec.experiment(smoke),
            T.TAG_OPTUNA_STORAGE: store_identity(checked.storage_url), T.TAG_SMOKE: str(smoke).lower(),
            T.TAG_OBJECTIVE: ",".join(spec.metrics), T.TAG_DIRECTIONS: ",".join(spec.directions),
            T.TAG_SAMPLER: f"{spec.sampler}(seed={spec.seed})", T.TAG_SPEC_PATH: str(spec.path),
            T.TAG_NOTE: spec.description,
            T.TAG_DEVICES: " ".join(checked.devices) if checked.devices else "this process",
            **({T.TAG_SKIPPED_ROWS: "; ".join(f"{k}: {v}" for k, v in skipped.items())} if skipped else {})}


def _open_study(checked: CheckedStudy, smoke: bool, heartbeat_s: int) -> Stores:
    """The study's Optuna study and its MLflow parent run (the YAML logged on it), created once or found, linked
    both ways (the parent run's tags; the study's user attributes, which is how a later start finds the parent:
    never by name). Done under the study's set-up lock, so peers starting at once make one study and one parent."""
    spec, experiment, url = checked.spec, checked.spec.experiment(smoke), checked.storage_url
    storage = open_storage(url, heartbeat_s)
    client = T.get_client(checked.tracking_uri)
    sampler = make_sampler(spec, parallel=shared(url) or len(checked.devices or []) > 1)
    with setup_lock(experiment, url):
        study = optuna.create_study(study_name=experiment, storage=storage, sampler=sampler,
                                    directions=spec.directions, load_if_exists=True)
        parent_id = T.study_parent_run(client, experiment, spec.name, _parent_tags(checked, smoke),
                                       run_id=study.user_attrs.get("mlflow_parent_run_id"))
        client.log_artifact(parent_id, str(spec.path))
        log_study_params(client, parent_id, spec, smoke)
        describe_experiment(client, experiment, spec, smoke)
        study.set_user_attr("heartbeat_s", study.user_attrs.get("heartbeat_s", heartbeat_s))  # the first start's
        for key, value in {"mlflow_parent_run_id": parent_id, "mlflow_experiment": experiment,
                           "mlflow_tracking_uri": checked.tracking_uri, "sfd_study": spec.name, "kind": spec.kind,
                           "spec_path": str(spec.path), "objective_metrics": spec.metrics, "smoke": smoke}.items():
            study.set_user_attr(key, value)
    T.fail_orphaned_runs(client)  # runs left RUNNING by processes of this host that are gone
    return Stores(study, storage, url, client, checked.tracking_uri, experiment,
                  T.get_or_create_experiment(client, experiment), parent_id)


def _resume(checked: CheckedStudy, loop: TrialLoop, smoke: bool, say) -> None:
    """Settle what dead processes left (their finished runs adopted, the rest interrupted), take the queued rows
    the YAML no longer runs off the queue, queue what is left, and say how many trials this process would run."""
    spec = checked.spec
    interrupted, adopted = loop.refresh(first=True)
    if interrupted:
        say(f"resumed: {interrupted} interrupted trial(s) marked FAILED and queued again")
    if adopted:
        say(f"resumed: {adopted} trial(s) whose run had finished adopted (not run again)")
    for row_id, reason in checked.skipped.items():
        say(f"skipped row {row_id}: {reason}")
    loop.todo = todo = trials_left(spec, loop.study.get_trials(deepcopy=False), loop.limit)
    say(f"study {spec.name}{' (smoke)' if smoke else ''}: {todo} trial(s) to run; MLflow "
        f"{without_password(checked.tracking_uri)} experiment {spec.experiment(smoke)!r}, Optuna "
        f"{without_password(checked.storage_url)} study {loop.study.study_name!r}")


def _run_trials(loop: TrialLoop, devices: list[str] | None, stores: Stores, start: float) -> tuple[float, int]:
    """Launch the trials; the parent run then gets the study's best row and, unless other processes still run
    trials of the study (the last one to end sets it), its status (`sfd.study.parent`: RUNNING while trials are
    queued, KILLED after a stop, FAILED after an error). Returns the invocation's wall time (tracked on the parent
    run with the number of trials that ended) and how many trials others run."""
    stopped = False
    seconds = error = None
    try:
        if devices:
            run_on(loop, devices)
        else:
            run_here(loop)
        seconds = time.perf_counter() - start
        stores.client.log_metric(stores.parent_id, "invocation/wall_s", seconds)
        stores.client.log_metric(stores.parent_id, "invocation/trials_run", loop.ran)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the trial's run ended KILLED and the trial FAIL (interrupted)
        stopped = True
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            others = loop.others_running()
        except Exception:  # noqa: BLE001 - the storage failed: the error on its way up says why
            others = 0
        log_study_summary(stores.client, stores.parent_id, loop.spec, stores.study, loop.smoke, seconds)
        if not others:
            end_invocation(stores.client, stores.parent_id, stores.study, stopped=stopped, error=error,
                           mine=loop.mine)
    return seconds, others
