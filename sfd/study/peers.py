"""What the processes running one study share through its Optuna storage, on Optuna's own guarantees (Optuna 5.1,
`optuna/storages/_rdb/storage.py` and `_heartbeat.py`):

- `RDBStorage.set_trial_state_values(id, RUNNING)` is a compare-and-set: it reads the trial `FOR UPDATE` and
  returns False unless the trial was WAITING (raises `UpdateFinishedTrialError` if it is finished). `Study.ask`
  pops the queue this way, but creates a NEW trial when it finds none waiting; `claim` pops the same way and never
  creates one, so a process that finds the queue empty records nothing.
- `record_heartbeat(id)` stamps the trial with the database's clock (`now()`), and `_get_stale_trial_ids` lists the
  RUNNING trials whose stamp is older than the grace period. `optuna.storages.fail_stale_trials` fails exactly
  those before running its callback, when the trial is already finished and read-only; `stale_trials` asks the
  same question so that the study can first record why, link the trial's run and adopt a run that finished.
- A trial with no heartbeat at all is never stale, so `claim` records the first one BEFORE the compare-and-set:
  a process killed between the two leaves a WAITING trial, never a RUNNING one without a heartbeat.
"""
from __future__ import annotations

import sys
import threading
import warnings
from typing import Callable

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState, create_trial

from sfd.storelock import backend, store_lock

HEARTBEAT_S = 20  # default heartbeat interval, seconds
GRACE_FACTOR = 3  # a trial is stale once its heartbeat is older than this many heartbeat intervals


def _rdb(url: str, heartbeat_s: int, create: bool) -> optuna.storages.RDBStorage:
    engine_kwargs = {"pool_pre_ping": True} if backend(url) == "postgresql" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval is "experimental" since 2.9
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                          grace_period=GRACE_FACTOR * heartbeat_s, skip_table_creation=not create)


def open_storage(url: str, heartbeat_s: int) -> optuna.storages.BaseStorage:
    """The study's Optuna storage with heartbeats every `heartbeat_s` seconds (stale after GRACE_FACTOR times
    that). Its schema is created (or checked) one process at a time: Optuna creates tables and a version row
    when it first opens a database, and two processes doing so at once collide."""
    with store_lock(url, "optuna-schema"):
        return optuna.storages.get_storage(_rdb(url, heartbeat_s, create=True))


def read_storage(url: str, heartbeat_s: int) -> optuna.storages.BaseStorage:
    """An existing storage, opened to read (no table is created), with the heartbeat settings `open_storage` uses.
    Under the same schema lock: Optuna still stamps its alembic version table on opening, and four peers' pre-flight
    checks opening a fresh database at once collided on it (UniqueViolation in CI)."""
    with store_lock(url, "optuna-schema"):
        return optuna.storages.get_storage(_rdb(url, heartbeat_s, create=False))


def trial_id(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int) -> int:
    """The storage's id of the study's trial `number`."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


class Heartbeats:
    """A thread of this process that records a heartbeat for each trial it runs (or has claimed), every interval."""

    def __init__(self, storage: optuna.storages.BaseStorage, interval_s: float):
        self.storage, self.interval_s = storage, interval_s
        self.trials: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, trial_id: int) -> None:
        """Beat for `trial_id` now and from now on."""
        self.storage.record_heartbeat(trial_id)
        with self._lock:
            self.trials.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self.trials.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                trials = sorted(self.trials)
            for tid in trials:
                try:
                    self.storage.record_heartbeat(tid)
                except Exception as exc:  # noqa: BLE001 - a database hiccup: the next beat tries again
                    print(f"note: heartbeat of trial id {tid} not recorded: {type(exc).__name__}: {exc}",
                          file=sys.stderr)

    def __enter__(self) -> "Heartbeats":
        self._thread = threading.Thread(target=self._run, name="sfd-heartbeats", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def claim(study: optuna.Study, storage: optuna.storages.BaseStorage, heartbeats: Heartbeats,
          ready: Callable[[FrozenTrial], bool]) -> optuna.Trial | None:
    """The first WAITING trial (in queue order) that is `ready`, claimed by this process through Optuna's
    compare-and-set and beating; None when there is none. Creates no trial."""
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if not ready(frozen):
            continue
        tid = trial_id(storage, study, frozen.number)
        heartbeats.add(tid)  # before the claim: a RUNNING trial without a heartbeat would never go stale
        try:
            claimed = storage.set_trial_state_values(tid, state=TrialState.RUNNING)
        except UpdateFinishedTrialError:  # failed meanwhile (taken off the queue)
            claimed = False
        if claimed:
            return optuna.Trial(study, tid)  # the sampler's before_trial runs here, as in Study.ask
        heartbeats.discard(tid)  # another process took it first
    return None


def queue_blank(study: optuna.Study) -> None:
    """A new search trial in the queue, without parameters (the sampler picks them once it is claimed). Call it
    under the study's `setup_lock`, after counting the trials, so peers never start more than the study asks."""
    study.add_trial(create_trial(state=TrialState.WAITING))


def stale_numbers(study: optuna.Study, storage: optuna.storages.BaseStorage) -> set[int]:
    """The numbers of the study's RUNNING trials whose heartbeat is older than the grace period (their process is
    gone): the question `optuna.storages.fail_stale_trials` asks, without failing them yet."""
    ids = storage._get_stale_trial_ids(storage.get_study_id_from_name(study.study_name))
    return {storage.get_trial(tid).number for tid in ids}
