"""Engines (one per URL per process) and a transactional session scope."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from vramflow.db.sqlite import BUSY_TIMEOUT_S, enable_wal

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers and one writer work at once across processes; the busy timeout makes
    # a concurrent writer wait instead of failing with "database is locked".
    enable_wal(dbapi_connection)
    dbapi_connection.execute("PRAGMA foreign_keys=ON")
    # In WAL, NORMAL syncs at checkpoints instead of at every commit: a commit took 3-5 ms
    # (0.2-0.5 ms without the sync), several of them between two batches on the GPU slot. A
    # crashed process loses nothing; a power cut can lose the last commits, pages that are
    # then run again. Prefect's own SQLite database makes the same choice.
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def get_engine(url: str) -> Engine:
    """The engine for `url`, created once per process."""
    with _lock:
        if url not in _engines:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite":
                if parsed.database and parsed.database != ":memory:":
                    Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
            _engines[url] = engine
        return _engines[url]


def dispose_engines() -> None:
    """Close every pooled connection (tests, and before a process forks)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    factory = sessionmaker(get_engine(url), expire_on_commit=False)
    with factory() as session, session.begin():
        yield session
