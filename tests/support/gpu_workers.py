"""Start `vramflow gpu-worker` processes for tests, and read the workers the database knows."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tests.support.servers import clean_env, tail
from vramflow.db import workers
from vramflow.db.session import session_scope

# Tests see a dead worker within seconds instead of the default half minute.
FAST_HEALTH = {
    "VRAMFLOW_GPU_WORKER_HEARTBEAT_SECONDS": "0.5",
    "VRAMFLOW_GPU_WORKER_TIMEOUT_SECONDS": "3",
}


def start_gpu_worker(
    env: Mapping[str, str], model: Path | str, log_path: Path, *args: str
) -> subprocess.Popen:
    """`python -m vramflow gpu-worker --preload MODEL` in its own process group."""
    command = [sys.executable, "-m", "vramflow", "gpu-worker", "--preload", str(model), *args]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            env=clean_env(**{"VRAMFLOW_INFERENCE": "gpu-worker", **FAST_HEALTH, **env}),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_until_serving(
    url: str, process: subprocess.Popen, log_path: Path, timeout: float = 120
) -> str:
    """The id of the worker `process` once it beats and its log says it serves; fails if it
    dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"GPU worker exited with {process.returncode}\n{tail(log_path)}")
        try:
            with session_scope(url) as session:
                live = [w.id for w in workers.alive(session, 3) if w.pid == process.pid]
        except Exception:  # tables not created yet
            live = []
        if live and "Subscribing to runs of task" in log_path.read_text(errors="replace"):
            return live[0]
        time.sleep(0.2)
    raise AssertionError(f"GPU worker not serving within {timeout} s\n{tail(log_path)}")
