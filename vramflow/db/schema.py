"""Bring a database to the current schema once per process."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import DBAPIError

from vramflow.db.migrate import upgrade

log = logging.getLogger(__name__)

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
        try:
            upgrade(url)
        except DBAPIError as exc:
            if not any(message in str(exc.orig) for message in _RACE_MESSAGES):
                raise
            log.info("another process was upgrading the database; trying again: %s", exc.orig)
            upgrade(url)
        _ready.add(url)
