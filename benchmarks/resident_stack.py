"""The stack benchmarks/resident.py measures: a real Prefect server, the process pool with the
repository's deployments, a Prefect worker and a GPU worker, and a sampler of flow-run processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from server import _free_port, _wait_healthy

from vramflow.config import PREFECT_SERVER_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
POOL = "vramflow-gpu"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class FlowProcess:
    """A flow-run process the Prefect worker started, as the sampler saw it."""

    pid: int
    started: float  # epoch seconds
    flow_run_id: str | None = None
    peak_rss: int = 0
    torch_loaded: bool = False


@dataclass
class Sampler:
    """Follows the Prefect worker's flow-run processes every 50 ms until stopped (their memory maps,
    to tell whether torch is loaded, every 0.5 s)."""

    worker_pid: int
    seen: dict[int, FlowProcess] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        looks = 0
        while not self.stop.wait(0.05):
            try:
                # Flow-run processes are the worker's children; theirs are PDF workers.
                children = psutil.Process(self.worker_pid).children()
            except psutil.NoSuchProcess:
                return
            looks += 1
            for child in children:
                self._sample(child, look_for_torch=looks % 10 == 0)

    def _sample(self, child: psutil.Process, look_for_torch: bool) -> None:
        try:
            found = self.seen.get(child.pid)
            if found is None:
                run_id = child.environ().get("PREFECT__FLOW_RUN_ID")
                if run_id is None:
                    return
                found = self.seen[child.pid] = FlowProcess(child.pid, child.create_time(), run_id)
            found.peak_rss = max(found.peak_rss, child.memory_info().rss)
            if look_for_torch and not found.torch_loaded:  # reading the maps costs: twice a second
                found.torch_loaded = any("libtorch" in m.path for m in child.memory_maps())
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
            pass


class Stack:
    """Server, pool, deployments, Prefect worker and GPU worker in `folder`."""

    def __init__(self, folder: Path, model: str) -> None:
        self.folder, self.model, self.processes = folder, model, []
        self.database_url = f"sqlite:///{folder / 'vramflow.db'}"
        self.env = self._base_env()
        # The process worker's job variables for every run triggered (e.g. its `command`).
        self.job_variables: dict[str, Any] = {}

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VRAMFLOW_"))}
        env.update(PREFECT_SERVER_DEFAULTS)
        env.update(
            PREFECT_HOME=str(self.folder / "prefect"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_WORKER_QUERY_SECONDS="1",
            VRAMFLOW_HOME=str(self.folder / "home"),
            VRAMFLOW_DATABASE_URL=self.database_url,
            VRAMFLOW_INFERENCE="gpu-worker",
            PYTHONPATH=str(REPO),
        )
        return env

    def start(self) -> None:
        port = _free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        server = self._spawn(
            "server", "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)
        )
        _wait_healthy(server, self.api_url, self.folder / "server.log")
        self.env["PREFECT_API_URL"] = self.api_url
        self._prefect("work-pool", "create", POOL, "--type", "process", "--overwrite")
        self._prefect("--no-prompt", "deploy", "--all")
        self.api = httpx.Client(base_url=f"{self.api_url}/", timeout=30)
        self._pause_schedules()  # no scheduled sweep among the measured runs
        self.gpu_worker = self._spawn(
            "gpu-worker", "-m", "vramflow", "gpu-worker", "--preload", self.model
        )
        self.worker = self._spawn("worker", "-m", "prefect", "worker", "start", "--pool", POOL)

    def _pause_schedules(self) -> None:
        for name in ("sweep-inbox", "retry-failed"):
            found = self._call("GET", f"deployments/name/{name}/{name}")
            for schedule in found["schedules"]:
                path = f"deployments/{found['id']}/schedules/{schedule['id']}"
                self.api.patch(path, json={"active": False}).raise_for_status()

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=self.folder,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def _prefect(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            cwd=REPO,
            env=self.env,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def trigger(self, deployment: str, **parameters: Any) -> str:
        found = self._call("GET", f"deployments/name/{deployment}/{deployment}")
        path = f"deployments/{found['id']}/create_flow_run"
        body = {"parameters": parameters, "job_variables": self.job_variables}
        return self._call("POST", path, json=body)["id"]

    def wait(self, run_ids: list[str], timeout: float = 1800) -> list[dict[str, Any]]:
        deadline, runs = time.monotonic() + timeout, {}
        while len(runs) < len(run_ids) and time.monotonic() < deadline:
            for run_id in set(run_ids) - runs.keys():
                run = self._call("GET", f"flow_runs/{run_id}")
                if (run.get("state") or {}).get("type") in FINAL:
                    runs[run_id] = run
            time.sleep(0.5)
        if len(runs) < len(run_ids):
            raise RuntimeError(f"runs not finished within {timeout:g} s: see {self.folder}")
        return [runs[r] for r in run_ids]

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        for pause in (0.2, 0.5, 1, 2, 4, 8, 0):  # the SQLite server answers 503 when busy
            response = self.api.request(method, path, **kwargs)
            if response.status_code not in (429, 502, 503):
                break
            time.sleep(pause)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
