"""Bring a database to the current schema once per process."""

from __future__ import annotations

import threading

from sqlalchemy.exc import OperationalError, ProgrammingError

from vramflow.db.models import Base
from vramflow.db.session import get_engine

_ready: set[str] = set()
_lock = threading.Lock()


def ensure_schema(url: str) -> None:
    """Create missing tables (idempotent; tolerant of another process doing it at once)."""
    with _lock:
        if url in _ready:
            return
        try:
            Base.metadata.create_all(get_engine(url))
        except (OperationalError, ProgrammingError):
            Base.metadata.create_all(get_engine(url))  # lost a race: the tables exist now
        _ready.add(url)
