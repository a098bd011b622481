"""Prefect's temporary local server, started once and shared by the benchmark's flow processes.

It is the same server a flow starts for itself when no `PREFECT_API_URL` is set (uvicorn
serving `prefect.server.api.server:create_app` on a SQLite file under `PREFECT_HOME`), with the
settings vramflow's CLI gives that server, started here so that its start-up is paid once,
before any clock runs, and its logs go to a file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import httpx

from vramflow.config import PREFECT_SERVER_DEFAULTS

STARTUP_TIMEOUT_S = 180.0


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(prefect_home: Path) -> dict[str, str]:
    """The environment of a server set up as vramflow's CLI sets up its temporary one."""
    env = {**PREFECT_SERVER_DEFAULTS, **os.environ}
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_UI_ENABLED="0",
        PREFECT__SERVER_EPHEMERAL="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


@contextmanager
def temporary_prefect_server(folder: Path) -> Iterator[str]:
    """Start a fresh server with its database in `folder`; yields its API URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    api_url = f"http://127.0.0.1:{port}/api"
    with open(folder / "server.log", "wb") as log:
        process = subprocess.Popen(
            command,
            env=server_env(folder / "home"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_healthy(process, api_url, folder / "server.log")
            yield api_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(process: subprocess.Popen, api_url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the Prefect server exited ({process.returncode}):\n{tail}")
            try:
                if client.get(f"{api_url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the Prefect server did not answer within {STARTUP_TIMEOUT_S:g} s")
