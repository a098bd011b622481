"""Start and stop real servers from tests: free ports, health waits, process-group cleanup.

Plain functions with no pytest dependency so any test (or a benchmark) can reuse them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from vramflow.config import PREFECT_SERVER_DEFAULTS

REPO_ROOT = Path(__file__).resolve().parents[2]

# A dedicated server's settings: those the README asks for (leases on disk, short hand-off
# waits, task-run states in batches), without the UI.
SERVER_SETTINGS = {**PREFECT_SERVER_DEFAULTS, "PREFECT_UI_ENABLED": "false"}


@dataclass
class PrefectServer:
    """A running `prefect server start`; `env` points a subprocess's Prefect client at it."""

    process: subprocess.Popen
    api_url: str
    home: Path
    log_path: Path
    env: dict[str, str]

    def stop(self) -> None:
        stop_process_group(self.process)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any PREFECT_* variable, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(overrides)
    return env


def wait_for_http(
    url: str, process: subprocess.Popen, log_path: Path, timeout: float = 120
) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode} before {url} answered\n" + tail(log_path)
            )
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s\n" + tail(log_path))


def start_prefect_server(
    home: Path, extra_env: Mapping[str, str] | None = None, timeout: float = 120
) -> PrefectServer:
    """Start `prefect server start` on a free port with its own PREFECT_HOME; wait until healthy."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = clean_env(PREFECT_HOME=str(home), **SERVER_SETTINGS, **(extra_env or {}))
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start"]
            + ["--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_for_http(f"{api_url}/health", process, log_path, timeout)
    except BaseException:
        stop_process_group(process)
        raise
    client_env = {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home / "client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return PrefectServer(process, api_url, home, log_path, client_env)


def stop_process_group(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group led by `process` (started with start_new_session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # The leader is gone; children that ignored SIGTERM must not outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        return


def tail(path: Path, lines: int = 60) -> str:
    """The last `lines` lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def api_url_everywhere(api_url: str) -> Iterator[None]:
    """Point this process's Prefect client at `api_url`, in every thread, for the block."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        settings = prefect.context.get_settings_context()
        with prefect.context._temporary_global_settings_context(settings):
            yield
