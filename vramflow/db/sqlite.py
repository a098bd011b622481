"""SQLite connection set-up shared by the session engines and the migration engine."""

from __future__ import annotations

import sqlite3
import time

BUSY_TIMEOUT_S = 60.0
# First and longest pause between tries of the WAL switch; it doubles up to the cap.
_RETRY_START_S = 0.005
_RETRY_CAP_S = 0.25


def enable_wal(dbapi_connection: sqlite3.Connection, timeout_s: float = BUSY_TIMEOUT_S) -> None:
    """Set a busy timeout and switch the file to WAL, retrying the switch while it is busy.

    Switching a file to WAL takes an exclusive lock. When another process is making the same
    switch, SQLite answers "database is locked" at once instead of calling the busy handler
    (waiting would deadlock the two shared locks), so `busy_timeout` alone does not cover
    two processes opening a new database together. Once the file is in WAL the switch is a
    no-op that returns at once.
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        deadline, pause = time.monotonic() + timeout_s, _RETRY_START_S
        while True:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, _RETRY_CAP_S)
    finally:
        cursor.close()
