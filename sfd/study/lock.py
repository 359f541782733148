"""One live process per study on a machine: an OS file lock beside the study's stores, and where a study's own
files (its lock, the YAML `--seeds` writes) go."""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

from sfd.tracking import runs_dir, sqlite_path

from .spec import StudyError

try:
    import fcntl
except ImportError:  # no POSIX file locks (Windows): studies run unguarded
    fcntl = None


def study_home(storage_url: str) -> Path:
    """Where a study's own files go (its lock, the YAML `--seeds` writes): beside a sqlite Optuna storage, so
    a study run with `--storage` elsewhere keeps them together; else the runs folder ($SFD_RUNS_DIR)."""
    path = sqlite_path(storage_url)
    return path.expanduser().resolve().parent if path is not None else runs_dir()


def lock_path(study_name: str, storage_url: str) -> Path:
    key = hashlib.sha1(f"{storage_url}\n{study_name}".encode()).hexdigest()[:12]
    return study_home(storage_url) / ".locks" / f"{study_name}-{key}.lock"


def lock_holder(study_name: str, storage_url: str) -> str | None:
    """Who is running the study on this machine now (the lock's note), or None; creates nothing."""
    path = lock_path(study_name, storage_url)
    if fcntl is None or not path.exists():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def study_lock(study_name: str, storage_url: str):
    """Hold an exclusive lock on (storage, study) for as long as the study runs on this machine.

    A resume marks every RUNNING trial as interrupted, which is only right when no other process is running
    the study. The lock is an OS file lock, released when the process ends in any way (SIGKILL too), so a
    crashed run never blocks the next one; a second live process is refused before it touches anything."""
    if fcntl is None:
        yield
        return
    path = lock_path(study_name, storage_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StudyError(f"study {study_name!r} in {storage_url} is already being run by {holder} on this "
                             f"machine (lock {path}); run one process per study and re-run this command after "
                             "it ends to resume") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
