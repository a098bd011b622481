"""Stop a process started with start_new_session and everything it started, even children that
moved to sessions of their own (a Prefect worker runs each flow run in a new session)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psutil

from tests.support.servers import stop_process_group


def stop_process_tree(process: subprocess.Popen, timeout: float = 10) -> None:
    """Stop `process`'s group, then any descendant (and its group) that outlived it."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    stop_process_group(process, timeout)
    for child in descendants:
        _signal(child, signal.SIGTERM)
    _gone, alive = psutil.wait_procs(descendants, timeout=timeout)
    for child in alive:
        _signal(child, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=timeout)


def _signal(child: psutil.Process, sig: signal.Signals) -> None:
    """Signal `child`, and its whole group if it leads one; never a reused pid."""
    with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
        if not child.is_running():
            return
        if os.getpgid(child.pid) == child.pid:
            os.killpg(child.pid, sig)
        child.send_signal(sig)
