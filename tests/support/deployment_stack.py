"""The deployed stack of the end-to-end deployment tests: a Prefect server's API, the process
pool and its worker, two GPU workers, and the PDFs the tests run.

Started the way an operator starts it, once for all of test_deployments_e2e.py (a module-scoped
fixture there): starting it takes a good part of that module's time.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gpu_workers import FAST_HEALTH, start_gpu_worker, wait_until_serving
from tests.support.process_tree import stop_process_tree
from tests.support.servers import REPO_ROOT, PrefectServer, clean_env, free_port, tail
from vramflow.db.session import dispose_engines
from vramflow.demo.pdfgen import write_text_pdf

POOL = "vramflow-gpu"
FLOWS = ("process-pdf", "sweep-inbox", "retry-failed")
CLI_TIMEOUT_S = 180
RUN_TIMEOUT_S = 300
RETRY_PAUSES_S = (0.5, 1, 2, 4, 8, 0)
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# PDFs made by the test (a fresh clone has no sample corpus), each with text on every page.
FIRST_PDF = "four-pages.pdf"
SWEEP_PDF = "one-page.pdf"
PAIR = ("five-pages.pdf", "six-pages.pdf")
PAGES = {FIRST_PDF: 4, SWEEP_PDF: 1, PAIR[0]: 5, PAIR[1]: 6}
LOCKED_PDF = "locked.pdf"  # encrypted, password "s3cret"


def make_pdfs(folder: Path) -> Path:
    """The PDFs of PAGES, and LOCKED_PDF, in a new `folder`."""
    folder.mkdir()
    for name, count in PAGES.items():
        texts = [f"{name}, page {n}: the pump in hall {n} was serviced." for n in range(count)]
        write_text_pdf(folder / name, texts, title=name)
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=folder / SWEEP_PDF)
    writer.encrypt(user_password="s3cret", algorithm="AES-256")
    with open(folder / LOCKED_PDF, "wb") as handle:
        writer.write(handle)
    return folder


@dataclass
class Stack:
    """The server's API, the worker's log and the database its flow runs write to."""

    api: httpx.Client
    database_url: str
    worker_log: Path
    gpu_worker_logs: list[Path]
    model: str
    root: Path
    metrics_ports: list[int] = field(default_factory=list)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)

    def trigger(self, deployment: str, **parameters: Any) -> str:
        """Create a flow run of `deployment` with `parameters`; returns its id."""
        deployment_id = self.deployments[deployment]["id"]
        path = f"deployments/{deployment_id}/create_flow_run"
        return self.call("POST", path, json={"parameters": parameters})["id"]

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call, tried again while the server answers 503 (its SQLite database busy),
        as Prefect's own client does."""
        for pause in RETRY_PAUSES_S:
            response = self.api.request(method, path, **kwargs)
            if response.status_code not in (429, 502, 503):
                break
            time.sleep(pause)
        response.raise_for_status()
        return response.json()

    def wait(
        self, run_id: str, timeout: float = RUN_TIMEOUT_S, expect: str = "COMPLETED"
    ) -> dict[str, Any]:
        """The flow run once it is final; fails unless in state `expect`, with its logs and the
        worker's."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.call("GET", f"flow_runs/{run_id}")
            state = run["state"]["type"] if run.get("state") else None
            if state in FINAL_STATES or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if state != expect:
            pytest.fail(
                f"flow run {run['name']} ({run_id}) is {state} after up to {timeout:.0f} s: "
                f"{(run.get('state') or {}).get('message')}\n{self.run_logs(run_id)}\n"
                + tail(self.worker_log, 80)
                + "".join(tail(log, 40) for log in self.gpu_worker_logs)
            )
        return run

    def run_logs_with(self, run_id: str, text: str, timeout: float = 30) -> str:
        """The run's logs once they contain `text`: a run's last logs reach the server in the
        client's next batch, after the run's final state."""
        deadline = time.monotonic() + timeout
        while text not in (logs := self.run_logs(run_id)) and time.monotonic() < deadline:
            time.sleep(0.5)  # polling the API for logs still in flight
        assert text in logs, logs
        return logs

    def run_logs(self, run_id: str) -> str:
        query = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"}
        logs = self.call("POST", "logs/filter", json=query)
        return "--- flow run logs ---\n" + "\n".join(f"{x['level']} {x['message']}" for x in logs)

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        query = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
        return self.call("POST", "artifacts/filter", json=query)


def _prefect(env: dict[str, str], *args: str) -> str:
    """`prefect ARGS` from the repository root (where prefect.yaml is); its output."""
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@contextmanager
def running_stack(prefect_server: PrefectServer, model_dir: Path, root: Path) -> Iterator[Stack]:
    """Deploy prefect.yaml to the pool, start its worker and two GPU workers sharing the one
    device, and stop them all afterwards."""
    make_pdfs(root / "pdfs")
    (root / "empty-inbox").mkdir()
    database_url = f"sqlite:///{root / 'vramflow.db'}"
    env = clean_env(
        **prefect_server.env,
        VRAMFLOW_HOME=str(root / "home"),
        VRAMFLOW_DATABASE_URL=database_url,
        VRAMFLOW_INBOX=str(root / "empty-inbox"),  # what a scheduled sweep would read
    )
    _prefect(env, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    _prefect(env, "--no-prompt", "deploy", "--all")
    env.update(FAST_HEALTH, VRAMFLOW_INFERENCE="gpu-worker")
    gpu_logs = [root / f"gpu-worker-{n}.log" for n in (1, 2)]
    metrics_ports = [free_port() for _ in gpu_logs]
    gpu_workers = [
        start_gpu_worker(env, model_dir, log, "--metrics-port", str(port))
        for log, port in zip(gpu_logs, metrics_ports, strict=True)
    ]
    log_path = root / "worker.log"
    worker = _start_worker(env, root, log_path)
    try:
        for process, log in zip(gpu_workers, gpu_logs, strict=True):
            wait_until_serving(database_url, process, log)
        with httpx.Client(base_url=f"{prefect_server.api_url}/", timeout=30) as api:
            stack = Stack(api, database_url, log_path, gpu_logs, str(model_dir), root)
            stack.metrics_ports = metrics_ports
            for flow in FLOWS:
                stack.deployments[flow] = stack.call("GET", f"deployments/name/{flow}/{flow}")
            _pause_schedules(stack, stack.deployments["sweep-inbox"])  # no sweep but ours
            yield stack
    finally:
        for process in [worker, *gpu_workers]:
            stop_process_tree(process)
        dispose_engines()


def _start_worker(env: dict[str, str], root: Path, log_path: Path) -> subprocess.Popen:
    """`prefect worker start` on the pool, polling for flow runs every second."""
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
            cwd=root,  # not the checkout: flow runs import the installed vramflow
            env=worker_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _pause_schedules(stack: Stack, deployment: dict[str, Any]) -> None:
    for schedule in deployment["schedules"]:
        path = f"deployments/{deployment['id']}/schedules/{schedule['id']}"
        stack.api.patch(path, json={"active": False}).raise_for_status()
