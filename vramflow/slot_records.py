"""On-disk records of who holds a GPU slot on this host, so that a dead holder's slot can be freed.

A holder writes `<records_dir>/<slot name>/<lease id>.json` right after it gets the slot and
removes it before it gives the slot back. A record whose process is gone (its pid no longer
exists, is a zombie, or now belongs to a younger process) marks a slot that nobody will release:
`claim_dead_records` hands each such record to exactly one caller, which then frees the slot.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
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
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(record.to_json())
        path = folder / f"{record.lease_id}.json"
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
