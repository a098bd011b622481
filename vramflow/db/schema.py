"""Bring a database to the current schema once per process."""

from __future__ import annotations

import logging
import threading

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from vramflow.db.session import get_engine

log = logging.getLogger(__name__)

# The newest script in migrations/versions (tests/test_db.py checks it against alembic's head).
# A database already there needs no alembic: every flow-run process asks, and importing alembic
# (with mako and pygments) plus taking the migration lock costs each one about 0.3 s.
HEAD_REVISION = "bb3b753d0494"

_ready: set[str] = set()
_lock = threading.Lock()
# What losing a race with another process's upgrade looks like, should the lock not cover it.
_RACE_MESSAGES = ("already exists", "database is locked", "duplicate key")


def ensure_schema(url: str) -> None:
    """Migrate the database to the newest revision (idempotent; tolerant of another process
    doing it at once: upgrades take a lock, and one that loses a race anyway runs again)."""
    with _lock:
        if url in _ready:
            return
        if at_head(url):
            _ready.add(url)
            return
        from vramflow.db.migrate import upgrade  # alembic: only when there is work to do

        try:
            upgrade(url)
        except DBAPIError as exc:
            if not any(message in str(exc.orig) for message in _RACE_MESSAGES):
                raise
            log.info("another process was upgrading the database; trying again: %s", exc.orig)
            upgrade(url)
        _ready.add(url)


def at_head(url: str) -> bool:
    """Whether the database's recorded revision is HEAD_REVISION (False where it has none yet,
    or the file or server is missing: `upgrade` then says what is wrong)."""
    try:  # the process's own engine: the run that asks goes on to use it
        with get_engine(url).connect() as conn:
            found = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except (OperationalError, ProgrammingError):  # no such table, or no such database yet
        return False
    return found == [HEAD_REVISION]
