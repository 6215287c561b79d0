"""The study database: Optuna's RDB storage over any SQLAlchemy URL.

SQLite (one file, the default) runs in WAL mode with a generous busy timeout so that the
driver and its workers write concurrently without "database is locked"; PostgreSQL is what a
cluster needs. Only the driver creates the schema: several processes creating it at once fail.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from prunesearch.errors import UserError

log = logging.getLogger(__name__)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and tables."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable storage URL>"


def _prepare_sqlite(url: sqlalchemy.URL) -> None:
    db = url.database
    if not db or db == ":memory:":
        raise UserError("an in-memory SQLite study cannot be shared with workers or resumed: give a file, e.g. sqlite:///studies.db")
    path = Path(db)
    if not path.parent.exists():
        raise UserError(f"cannot create the study database {path}: folder {path.parent} does not exist")
    with sqlite3.connect(path, timeout=60) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent in the file: concurrent readers and one writer


def open_storage(url: str, *, create: bool = True) -> optuna.storages.RDBStorage:
    """Open (and by default create) the study database; unreachable or malformed URLs are UserErrors."""
    try:
        parsed = make_url(url)
    except Exception:
        raise UserError(f"storage '{mask_url(url)}' is not a database URL (e.g. sqlite:///studies.db or postgresql+psycopg://user@host/db)") from None
    engine_kwargs: dict = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        _prepare_sqlite(parsed)
        engine_kwargs["connect_args"] = {"timeout": 60}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=not create)
    except ImportError:
        raise UserError(f"no database driver for '{parsed.drivername}' is installed") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot reach the study database {mask_url(url)}: {reason}") from None
