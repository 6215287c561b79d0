"""The study database: Optuna's RDB storage over any SQLAlchemy URL.

SQLite (one file, the default) runs in WAL mode with a generous busy timeout so that the
driver and its workers write concurrently without "database is locked"; PostgreSQL is what a
cluster needs. Only drivers create the schema (`status`, `export`, `report`, workers open with
create=False); processes that open a fresh database at the same moment retry the version
bookkeeping Optuna writes on every open, instead of failing.

Passwords never appear in a URL: a server URL names user, host and database, and the password
comes from $PRUNESEARCH_DB_PASSWORD or the file named by $PRUNESEARCH_DB_PASSWORD_FILE (a
mounted secret). So no config, study record, log line or process list ever holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import random
import sqlite3
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from prunesearch.config import storage_url_problem
from prunesearch.errors import UserError

log = logging.getLogger(__name__)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and tables."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable storage URL>"


PASSWORD_ENV, PASSWORD_FILE_ENV = "PRUNESEARCH_DB_PASSWORD", "PRUNESEARCH_DB_PASSWORD_FILE"
_driver_locks: dict[str, int] = {}  # SQLite files this process drives, with their lock fds


def _with_password(url: sqlalchemy.URL) -> sqlalchemy.URL:
    """Refuse a password written in the URL; fill it in from the environment or a secret file."""
    if url.password is not None:
        raise UserError(f"storage {url.render_as_string(hide_password=True)}: do not write the password in the URL; "
                        f"set {PASSWORD_ENV} or {PASSWORD_FILE_ENV} (a file holding it) instead")
    if url.get_backend_name() == "sqlite":
        return url
    password = os.environ.get(PASSWORD_ENV)
    if password is None and os.environ.get(PASSWORD_FILE_ENV):
        path = Path(os.environ[PASSWORD_FILE_ENV])
        try:
            password = path.read_text().strip()
        except OSError as exc:
            raise UserError(f"cannot read the database password file {path} ({PASSWORD_FILE_ENV}): {exc.strerror}") from None
    return url.set(password=password) if password else url


def claim_sqlite(url: str) -> None:
    """Say clearly when a second driver works on the same SQLite file: it works, but SQLite
    serialises every write, so several drivers (or a cluster) belong on PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database in _driver_locks:
        return
    fd = os.open(f"{parsed.database}.driver-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("the SQLite study file %s is in use by another prunesearch driver: SQLite serialises their writes; "
                    "for several drivers use PostgreSQL (storage: postgresql+psycopg://USER@HOST/DB)", parsed.database)
        os.close(fd)
        return
    _driver_locks[parsed.database] = fd  # held (and released by the OS) for this process's life



def _read_only_query(path: Path) -> dict[str, str]:
    """URI options that read a file without writing a byte. A WAL-mode file in a folder nobody
    may write to, with no shared-memory file beside it, can only be read as immutable."""
    folder_writable = os.access(path.parent, os.W_OK | os.X_OK)
    if not folder_writable and not Path(f"{path}-shm").exists():
        return {"mode": "ro", "immutable": "1"}
    return {"mode": "ro"}


def _sqlite_tables(path: Path) -> set[str]:
    """The tables of an existing SQLite file, read without changing a byte of it."""
    query = "&".join(f"{k}={v}" for k, v in _read_only_query(path).items())

    def read() -> set[str]:
        with contextlib.closing(sqlite3.connect(f"file:{path}?{query}", uri=True, timeout=60)) as conn:
            return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    return _while_busy(read, path)


def _while_busy(action, path: Path, patience_s: float = 60.0):
    """Run a short SQLite action, again while the file is busy. SQLite answers "database is
    locked" at once, without its busy timeout, when two connections would deadlock (both
    switching a fresh file to WAL) or one is recovering the WAL: processes opening a new study
    file at the same moment hit exactly that. Any other error is the user's file: one line."""
    deadline = time.monotonic() + patience_s
    for attempt in itertools.count():
        try:
            return action()
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or time.monotonic() > deadline:
                raise UserError(f"cannot use {path} as a study database: {exc}") from None
            time.sleep(min(1.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.5))
        except sqlite3.Error as exc:  # not a database, a truncated file, no permission
            raise UserError(f"cannot use {path} as a study database: {exc}") from None


def _check_sqlite_file(path: Path, must_exist: bool) -> None:
    """A file that is there must be empty or a study database: another application's SQLite file
    is refused untouched, never given Optuna's tables."""
    if path.is_dir():
        raise UserError(f"study database {path} is a directory: give a file, e.g. sqlite:///{path}/studies.db")
    if not path.exists():
        if must_exist:
            raise UserError(f"no study database at {path}: `prunesearch launch` creates it (is the path right?)")
        return
    tables = _sqlite_tables(path)
    if tables and not tables & {"studies", "alembic_version"}:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise UserError(f"{path} is not a study database (it holds other tables: {shown}): "
                        f"give a new file for the study, e.g. sqlite:///{path.parent / 'studies.db'}")
    if not tables and must_exist:
        raise UserError(f"no study database at {path} yet (the file is empty): `prunesearch launch` creates it")


def _check_writable(path: Path) -> None:
    """A driver writes the file, its WAL and lock files beside it: say so before any slow work."""
    folder = path.parent
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"study database {path} is read-only: a launch or resume writes to it (copy it somewhere writable, "
                        f"or use `prunesearch status/export/report`, which only read)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"the folder of the study database {path} is read-only: a launch or resume writes the database "
                        f"and its journal there")


def _checked_sqlite_path(url: sqlalchemy.URL, create: bool, readonly: bool) -> Path:
    """The study file, checked as the command will use it, without writing anything."""
    db = url.database
    if not db or db == ":memory:":
        raise UserError("an in-memory SQLite study cannot be shared with workers or resumed: give a file, e.g. sqlite:///studies.db")
    path = Path(db)
    if not path.parent.exists():
        raise UserError(f"cannot {'create' if create else 'open'} the study database {path}: folder {path.parent} does not exist")
    if not readonly:
        _check_writable(path)
    _check_sqlite_file(path, must_exist=not create)
    return path


def _prepare_sqlite(url: sqlalchemy.URL, create: bool, readonly: bool) -> sqlalchemy.URL:
    """Check the file as the command will use it; return the URL to open (read-only for readers)."""
    path = _checked_sqlite_path(url, create, readonly)
    if readonly:
        return url.set(database=f"file:{path.resolve()}", query={**_read_only_query(path), "uri": "true"})

    def to_wal() -> None:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")  # persistent in the file: concurrent readers and one writer

    _while_busy(to_wal, path)
    return url


def _parsed(url: str) -> sqlalchemy.URL:
    """The storage URL parsed, its password from the environment; malformed is a UserError."""
    try:
        parsed = make_url(url)
    except Exception:
        raise UserError(describe_storage_url(url)) from None
    return _with_password(parsed)


def check_storage(url: str) -> None:
    """What a driver's ``open_storage`` would refuse, found without writing anything: a malformed
    URL, a password in it, another application's SQLite file, a read-only file or folder."""
    parsed = _parsed(url)
    if parsed.get_backend_name() == "sqlite":
        _checked_sqlite_path(parsed, create=True, readonly=False)


def describe_storage_url(url: str) -> str:
    """Why a storage string is not a URL, naming what was typed (a password masked)."""
    shown = url if "@" not in url else "<the --storage URL>"
    return f"storage '{shown}': {storage_url_problem(url)}"


def open_storage(url: str, *, create: bool = True, readonly: bool = False, heartbeat: tuple[int, int] | None = None,
                 on_stale=None) -> optuna.storages.RDBStorage:
    """Open (and by default create) the study database; unreachable or malformed URLs are UserErrors.

    ``readonly`` (status, export, report) opens an existing study database without writing a
    byte (SQLite: a read-only connection, no journal-mode change). ``heartbeat`` = (interval,
    grace period) in seconds turns on trial heartbeats: a RUNNING trial whose heartbeat is older
    than the grace period belongs to a dead driver (search/dispatch.py fails it exactly once).
    """
    create = create and not readonly
    parsed = _parsed(url)
    engine_kwargs: dict = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        parsed = _prepare_sqlite(parsed, create, readonly)
        engine_kwargs["connect_args"] = {"timeout": 60}
    hb = {}
    if heartbeat is not None:
        hb = {"heartbeat_interval": heartbeat[0], "grace_period": heartbeat[1], "heartbeat_stale_trial_callback": on_stale}
    full = parsed.render_as_string(hide_password=False)
    for attempt in range(_RACE_RETRIES + 1):
        started = time.monotonic()
        try:
            if not create:
                _require_schema(full, engine_kwargs, url)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(full, engine_kwargs=engine_kwargs, skip_table_creation=not create, **hb)
        except ImportError:
            raise UserError(f"no database driver for '{parsed.drivername}' is installed") from None
        except RuntimeError as exc:  # Optuna: the schema is of another Optuna version
            raise UserError(f"study database {mask_url(url)}: {str(exc).splitlines()[0]}") from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            if attempt < _RACE_RETRIES and _is_schema_race(exc, time.monotonic() - started):
                time.sleep(0.1 * 2**attempt)  # another process is setting the schema up: it is there in a moment
                continue
            reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot reach the study database {mask_url(url)}: {reason}") from None
    raise AssertionError("unreachable")


# Optuna's RDBStorage writes its version row and alembic stamp whenever it opens a database, so
# processes opening a fresh one at once (two drivers, a driver and `status`) collide on them.
_RACE_RETRIES = 6
_SCHEMA_RACE = ("already exists", "unique constraint", "duplicate key")


def _is_schema_race(exc: Exception, waited_s: float) -> bool:
    """Another process set the schema up first, or SQLite refused a write at once (its deadlock
    answer, given without the busy timeout); "locked" after a long wait is a real lock holder."""
    text = str(getattr(exc, "orig", exc)).lower()
    return any(s in text for s in _SCHEMA_RACE) or ("database is locked" in text and waited_s < 5.0)


def _require_schema(full_url: str, engine_kwargs: dict, shown: str) -> None:
    """Readers never create the schema (only drivers do): no tables yet is a clear error."""
    engine = sqlalchemy.create_engine(full_url, **engine_kwargs)
    try:
        found = sqlalchemy.inspect(engine).has_table("alembic_version")  # Optuna's last step in setting one up
    finally:
        engine.dispose()
    if not found:
        raise UserError(f"no study database at {mask_url(shown)} yet: `prunesearch launch` creates it")
