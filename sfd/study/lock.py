"""Who may run a study, and where a study's own files go.

A sqlite study runs in one live process at a time: an OS file lock keyed by the database's REAL file (however its
URL is spelled) and the study name, held for the whole invocation; a second process is refused before it writes
anything. A PostgreSQL study is run by any number of peers, on any machines: they set the study up one at a time
under an advisory lock of the database (`setup_lock`) and share the rest through Optuna's own atomic claims.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from sfd.storelock import (LockBusy, advisory_lock, backend, file_lock, file_lock_holder, real_sqlite_path,
                           sqlite_lock_path)
from sfd.tracking import runs_dir

from .spec import StudyError

PEER_BACKENDS = ("postgresql",)  # Optuna storages that peers on many machines may share


def shared(storage_url: str) -> bool:
    """Whether peers may run the study at once (a database server), rather than one process (sqlite)."""
    return backend(storage_url) in PEER_BACKENDS


def study_home(storage_url: str) -> Path:
    """Where a study's own files go (its lock, the YAML `--seeds` writes): beside a sqlite Optuna storage's real
    file, so a study run with `--storage` elsewhere keeps them together; else the runs folder ($SFD_RUNS_DIR)."""
    real = real_sqlite_path(storage_url)
    return real.parent if real is not None else runs_dir()


def lock_path(study_name: str, storage_url: str) -> Path:
    return sqlite_lock_path(storage_url, study_name)


def lock_holder(study_name: str, storage_url: str) -> str | None:
    """Who is running a sqlite study on this machine now (the lock's note), or None; creates nothing."""
    return None if shared(storage_url) else file_lock_holder(lock_path(study_name, storage_url))


@contextlib.contextmanager
def study_lock(study_name: str, storage_url: str):
    """For a sqlite storage, hold an exclusive lock on (database file, study) for as long as the study runs here.

    It is what makes a resume safe on sqlite: while it is held no other process runs the study, so a trial left
    RUNNING is certainly dead. Released when the process ends in any way (SIGKILL too), so a crashed run never
    blocks the next one; a second live process is refused before it writes anything. A PostgreSQL study takes no
    lock here: its peers run at once (`setup_lock`)."""
    if shared(storage_url):
        yield
        return
    note = f"process {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})"
    try:
        with file_lock(lock_path(study_name, storage_url), wait=False, note=note):
            yield
    except LockBusy as busy:
        raise StudyError(f"study {study_name!r} in {storage_url} is already being run by {busy.holder} on this "
                         f"machine (lock {busy.path}); run one process per sqlite study (or share a PostgreSQL "
                         "storage between peers) and re-run this command after it ends to resume") from None


@contextlib.contextmanager
def setup_lock(study_name: str, storage_url: str):
    """Changing what the study's peers share (creating the study and its parent run, queueing rows, retrying dead
    trials) one peer at a time: PostgreSQL's advisory lock on a key derived from the study name. On sqlite the
    `study_lock` the process already holds does it."""
    if not shared(storage_url):
        yield
        return
    with advisory_lock(storage_url, "sfd.study", study_name):
        yield
