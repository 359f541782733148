"""Locks keyed by what a store IS, not by how its URL is spelled: a sqlite database by its real file (so
`sqlite:///runs/./optuna.db`, a symlink or a relative path name the same lock), a PostgreSQL database by an
advisory lock inside that database (so peers on every machine share it). Used to create a store's schema once
(MLflow's and Optuna's migrations race when two processes open a new store at once) and to set a study up once.

A file lock is an OS lock (`fcntl.flock`) and an advisory lock belongs to a database session: either is released
when its process ends in any way, SIGKILL included, so a dead process never blocks the next one.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Iterator

import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

try:
    import fcntl
except ImportError:  # no POSIX file locks (Windows): sqlite stores run unguarded
    fcntl = None

LOCKS_DIR = ".locks"  # beside a sqlite database file
ADVISORY_WAIT_S = 600  # how long a PostgreSQL advisory lock is waited for before giving up with a message


class LockBusy(RuntimeError):
    """A lock that is not waited for is held by another process; `holder` is its note."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


def backend(url: str) -> str | None:
    """The database behind a SQLAlchemy URL (`sqlite`, `postgresql`, `mysql`, ...), or None when it is not one."""
    try:
        return make_url(url).get_backend_name()
    except Exception:  # noqa: BLE001 - not a database URL (http://, file:, a path)
        return None


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL as written (relative to the working directory, like SQLAlchemy), or
    None (not sqlite, or an in-memory database)."""
    if backend(url) != "sqlite":
        return None
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def real_sqlite_path(url: str) -> Path | None:
    """The sqlite file's real path (symlinks, `.` and `..` resolved): the same file however the URL spells it."""
    path = sqlite_path(url)
    return Path(os.path.realpath(path.expanduser())) if path is not None else None


def without_password(url: str) -> str:
    """A database URL safe to log and print: the password dropped (PostgreSQL then reads it from PGPASSWORD or
    ~/.pgpass, as any client does). Other URLs unchanged."""
    if backend(url) is None:
        return url
    u = make_url(url)
    if u.password is None:
        return url
    return URL.create(u.drivername, username=u.username, host=u.host, port=u.port, database=u.database,
                      query=u.query).render_as_string(hide_password=False)


def store_identity(url: str) -> str:
    """The store a URL names, spelled one way: a sqlite database by its real file, a server database without its
    password. Two URLs of one store give the same identity."""
    real = real_sqlite_path(url)
    return f"sqlite:///{real}" if real is not None else without_password(url)


def _key(*parts: str) -> str:
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]


def sqlite_lock_path(url: str, name: str) -> Path:
    """`<folder of the real database file>/.locks/<name>-<key>.lock`, the key derived from the real file's path
    and `name`."""
    real = real_sqlite_path(url)
    return real.parent / LOCKS_DIR / f"{name}-{_key(str(real), name)}.lock"


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool, note: str = "") -> Iterator[None]:
    """Hold an exclusive OS lock on `path` (created with its folder); `wait=False` raises `LockBusy` with the
    holder's note instead of waiting. `note` is written into the file for the next one to read."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            raise LockBusy(path, handle.read().strip() or "another process") from None
        if note:
            handle.seek(0)
            handle.truncate()
            handle.write(note)
            handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_lock_holder(path: Path) -> str | None:
    """The note of whoever holds the lock on `path` now, or None; creates nothing."""
    if fcntl is None or not path.exists():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def advisory_key(*parts: str) -> int:
    """A signed 64-bit key for `pg_advisory_lock`, derived from `parts` (e.g. what is locked and a study name)."""
    digest = hashlib.sha1("\n".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def advisory_lock(url: str, *parts: str, wait_s: float = ADVISORY_WAIT_S) -> Iterator[None]:
    """Hold PostgreSQL's session advisory lock on `advisory_key(*parts)` in the database at `url`, on a connection
    of its own (released by `pg_advisory_unlock`, or by the server when this process's session ends)."""
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    key = advisory_key(*parts)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"SET lock_timeout = {int(wait_s * 1000)}"))
            start = time.monotonic()
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            except sqlalchemy.exc.OperationalError as exc:
                raise TimeoutError(f"waited {time.monotonic() - start:.0f}s for the lock on {' '.join(parts)!r} in "
                                   f"{without_password(url)} (another process holds it)") from exc
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def store_lock(url: str, purpose: str) -> Iterator[None]:
    """One process at a time does `purpose` (e.g. creating MLflow's schema) on the store at `url`: a file lock
    beside a sqlite database's real file, an advisory lock in a PostgreSQL database; other stores (an MLflow
    server, which migrates its own schema when it starts; a folder) need none."""
    kind = backend(url)
    if kind == "sqlite" and sqlite_path(url) is not None:
        with file_lock(sqlite_lock_path(url, purpose), wait=True, note=f"process {os.getpid()}: {purpose}"):
            yield
    elif kind == "postgresql":
        with advisory_lock(url, "sfd", purpose):
            yield
    else:
        yield
