"""Records of the temporary Prefect servers `vramflow run` starts, to stop orphaned ones.

Prefect stops its temporary server at exit, but a process killed with SIGKILL (or by the OOM
killer) never gets there: the server lives on, re-parented to init. Each `vramflow run` records
its server under `VRAMFLOW_HOME/servers/`, and the next run stops the servers whose recording
process is gone. Creation times guard against reused pids: a record only matches the very
processes it was written for.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0


def _created(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def record_server(folder: Path, server_pid: int) -> Path:
    """Write this process's record of its temporary server; returns the record's path."""
    folder.mkdir(parents=True, exist_ok=True)
    owner = os.getpid()
    record = {
        "owner_pid": owner,
        "owner_created": _created(owner),
        "server_pid": server_pid,
        "server_created": _created(server_pid),
    }
    path = folder / f"{owner}.json"
    path.write_text(json.dumps(record))
    return path


def stop_recorded(path: Path) -> None:
    """Stop the server of this record (this process's own, at an exit that skips Prefect's
    clean-up) and remove the record."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    _stop(record["server_pid"], record["server_created"])
    path.unlink(missing_ok=True)


def stop_orphans(folder: Path) -> list[int]:
    """Stop the recorded servers whose recording process has gone; returns their pids."""
    stopped = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if _created(record["owner_pid"]) == record["owner_created"]:
            continue  # its vramflow process still runs (and will stop its server itself)
        if _stop(record["server_pid"], record["server_created"]):
            stopped.append(record["server_pid"])
        path.unlink(missing_ok=True)
    return stopped


def _stop(pid: int, created: float | None) -> bool:
    """Terminate the process if it is still the one recorded; True if it was stopped."""
    if created is None or _created(pid) != created:
        return False
    process = psutil.Process(pid)
    try:
        process.terminate()
        process.wait(STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)
    except psutil.NoSuchProcess:
        return False
    log.info("stopped the orphaned temporary Prefect server %d", pid)
    return True
