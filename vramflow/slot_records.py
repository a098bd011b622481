"""On-disk records of who holds a GPU slot on this host, so that a dead holder's slot can be freed.

A holder writes `<records_dir>/<slot name>/<lease id>.json` right after it gets the slot and
removes it before it gives the slot back. A record whose process is gone (its pid no longer
exists, is a zombie, or now belongs to a younger process) marks a slot that nobody will release:
`claim_dead_records` hands each such record to exactly one caller, which then frees the slot.

Processes waiting for a slot stand in a line of marker files, `<slot name>/waiting/<pid>.json`
(see `waiting_line`), so that the slot goes to the process that has waited longest.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

import psutil

from vramflow.errors import ConfigError

logger = logging.getLogger(__name__)

# Linux derives a process's start time from the boot time, which the kernel recomputes from the
# wall clock; the same process can therefore read a few milliseconds (rarely up to a second)
# differently from one call to the next. A pid reused within one second is not realistic.
_CREATE_TIME_TOLERANCE_SECONDS = 1.0


@dataclass(frozen=True)
class Record:
    """One held slot: which process holds which lease of which limit since when."""

    name: str
    lease_id: UUID
    limit_id: UUID | None
    host: str
    pid: int
    create_time: float
    acquired_at: datetime

    def to_json(self) -> str:
        data = asdict(self)
        data["lease_id"] = str(self.lease_id)
        data["limit_id"] = str(self.limit_id) if self.limit_id else None
        data["acquired_at"] = self.acquired_at.isoformat()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Record:
        data = json.loads(text)
        return cls(
            name=data["name"],
            lease_id=UUID(data["lease_id"]),
            limit_id=UUID(data["limit_id"]) if data.get("limit_id") else None,
            host=data["host"],
            pid=int(data["pid"]),
            create_time=float(data["create_time"]),
            acquired_at=datetime.fromisoformat(data["acquired_at"]),
        )


def current_holder(name: str, lease_id: UUID, limit_id: UUID | None) -> Record:
    """A record for a slot this process has just acquired."""
    return Record(
        name=name,
        lease_id=lease_id,
        limit_id=limit_id,
        host=socket.gethostname(),
        pid=os.getpid(),
        create_time=psutil.Process().create_time(),
        acquired_at=datetime.now(timezone.utc),
    )


def write_record(records_dir: Path, record: Record) -> Path:
    """Write `record` atomically (readers never see a partial file); returns its path."""
    folder = _slot_dir(records_dir, record.name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.lease_id}.json"
    _write_atomically(path, record.to_json())
    return path


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_record(records_dir: Path, name: str, lease_id: UUID) -> bool:
    """Remove a record; False if it was already gone (another process claimed it)."""
    try:
        (_slot_dir(records_dir, name) / f"{lease_id}.json").unlink()
    except FileNotFoundError:
        return False
    return True


def claim_dead_records(records_dir: Path, name: str) -> list[Record]:
    """Claim every record of slot `name` on this host whose process is gone.

    Claiming deletes the file; when several processes race, each record goes to exactly one of
    them (only one `unlink` of a path succeeds). The caller must free the claimed slots.
    """
    folder = _slot_dir(records_dir, name)
    if not folder.is_dir():
        return []
    host = socket.gethostname()
    claimed = []
    for path in sorted(folder.glob("*.json")):
        record = _read(path)
        if record is None or record.host != host or is_alive(record.pid, record.create_time):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        logger.info("claimed the record of dead slot holder pid %s (%s)", record.pid, path.name)
        claimed.append(record)
    return claimed


def is_alive(pid: int, create_time: float) -> bool:
    """Whether process `pid` still runs and is the one that started at `create_time`."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - create_time) <= _CREATE_TIME_TOLERANCE_SECONDS
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


# --- the line of processes waiting for a slot ----------------------------------------------------
#
# Prefect's limits keep no queue: a freed slot goes to whichever process asks first, which is
# nearly always the process that just freed it. Processes of this host that wait for a slot
# therefore write a marker; the one waiting longest asks the server, the others let it.

# A waiter refreshes its marker at every poll; one not refreshed for this long is ignored (a
# process stopped with SIGSTOP, or a clock jump), so that nobody waits behind it forever.
_STALE_MARKER_SECONDS = 10.0


@dataclass(frozen=True)
class Waiter:
    """A process of this host waiting for slot `name` since `since` (seconds since the epoch)."""

    pid: int
    create_time: float
    since: float


class WaitingLine:
    """This process's place in the line for slot `name`; see `waiting_line`."""

    def __init__(self, folder: Path, me: Waiter) -> None:
        self._folder, self._me = folder, me
        self._path = folder / f"{me.pid}.json"

    def join(self) -> None:
        """Write this process's marker (again, if it was removed by hand or by a cleanup)."""
        _write_atomically(self._path, json.dumps(asdict(self._me)))

    def leave(self) -> None:
        self._path.unlink(missing_ok=True)

    def refresh(self) -> None:
        """Show that this process still waits (its marker is not stale)."""
        try:
            os.utime(self._path)
        except FileNotFoundError:
            self.join()

    def ahead(self) -> list[Waiter]:
        """Live processes of this host that have waited longer than this one."""
        return [w for w in _live_waiters(self._folder) if _before(w, self._me)]


@contextmanager
def waiting_line(records_dir: Path, name: str) -> Iterator[WaitingLine]:
    """Stand in line for slot `name` for the duration of the block."""
    folder = _line_dir(records_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    line = WaitingLine(folder, Waiter(os.getpid(), psutil.Process().create_time(), time.time()))
    line.join()
    try:
        yield line
    finally:
        line.leave()


def others_waiting(records_dir: Path, name: str) -> bool:
    """Whether a live process of this host other than this one waits for slot `name`."""
    folder = _line_dir(records_dir, name)
    if not folder.is_dir():
        return False
    return any(w.pid != os.getpid() for w in _live_waiters(folder))


def _line_dir(records_dir: Path, name: str) -> Path:
    return _slot_dir(records_dir, name) / "waiting"


def _live_waiters(folder: Path) -> list[Waiter]:
    now, waiters = time.time(), []
    for path in folder.glob("*.json"):
        try:
            fresh = now - path.stat().st_mtime < _STALE_MARKER_SECONDS
            waiter = Waiter(**json.loads(path.read_text())) if fresh else None
        except FileNotFoundError:
            continue
        except (ValueError, TypeError) as exc:
            logger.warning("ignoring unreadable waiting marker %s: %s", path, exc)
            continue
        if waiter is not None and is_alive(waiter.pid, waiter.create_time):
            waiters.append(waiter)
    return waiters


def _before(a: Waiter, b: Waiter) -> bool:
    return (a.since, a.pid) < (b.since, b.pid)


def _read(path: Path) -> Record | None:
    try:
        return Record.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable slot record %s: %s", path, exc)
        return None


def _slot_dir(records_dir: Path, name: str) -> Path:
    if not name or "/" in name or name in {".", ".."}:
        raise ConfigError(f"invalid slot name {name!r}")
    return Path(records_dir) / name


def waiters(records_dir: Path, name: str) -> list[Waiter]:
    """Live processes of this host waiting for slot `name`, longest waiting first."""
    folder = _line_dir(records_dir, name)
    found = _live_waiters(folder) if folder.is_dir() else []
    return sorted(found, key=lambda w: (w.since, w.pid))
