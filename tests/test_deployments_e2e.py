"""Deployments end to end, the way an operator runs vramflow.

One real `prefect server start` with its database on PostgreSQL (as a team runs it), the
`vramflow-gpu` process pool, `prefect --no-prompt deploy --all` from the repository root, one
`prefect worker start` whose flow runs write to a temporary SQLite database, and two
`vramflow gpu-worker` processes sharing the one device, which answer every flow run's pages.
Runs are triggered through the REST API; results are checked in the database, artifacts through
the API. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from tests.support.gpu_workers import FAST_HEALTH, start_gpu_worker, wait_until_serving
from tests.support.process_tree import stop_process_tree
from tests.support.servers import REPO_ROOT, PrefectServer, clean_env, free_port, tail
from vramflow.db.models import Attempt, Document, Result, SlotHold
from vramflow.db.session import dispose_engines, session_scope
from vramflow.demo.pdfgen import write_text_pdf

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

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


def _make_pdfs(folder: Path) -> Path:
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


@pytest.fixture(scope="module")
def stack(
    prefect_server_on_postgres: PrefectServer,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    prefect_server = prefect_server_on_postgres
    root = tmp_path_factory.mktemp("deployments")
    _make_pdfs(root / "pdfs")
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
        start_gpu_worker(env, tiny_model_dir, log, "--metrics-port", str(port))
        for log, port in zip(gpu_logs, metrics_ports, strict=True)
    ]
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log_path = root / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
            cwd=root,  # not the checkout: flow runs import the installed vramflow
            env=worker_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        for process, log in zip(gpu_workers, gpu_logs, strict=True):
            wait_until_serving(database_url, process, log)
        with httpx.Client(base_url=f"{prefect_server.api_url}/", timeout=30) as api:
            stack = Stack(api, database_url, log_path, gpu_logs, str(tiny_model_dir), root)
            stack.metrics_ports = metrics_ports
            for flow in FLOWS:
                stack.deployments[flow] = stack.call("GET", f"deployments/name/{flow}/{flow}")
            _pause_schedules(stack, stack.deployments["sweep-inbox"])  # no sweep but ours
            yield stack
    finally:
        for process in [worker, *gpu_workers]:
            stop_process_tree(process)
        dispose_engines()


def _pause_schedules(stack: Stack, deployment: dict[str, Any]) -> None:
    for schedule in deployment["schedules"]:
        path = f"deployments/{deployment['id']}/schedules/{schedule['id']}"
        stack.api.patch(path, json={"active": False}).raise_for_status()


@pytest.fixture(scope="module")
def first_run(stack: Stack) -> dict[str, Any]:
    """process-pdf over a 4-page PDF made by the test, triggered through the REST API."""
    run_id = stack.trigger(
        "process-pdf",
        path=str(stack.root / "pdfs" / FIRST_PDF),
        model=stack.model,
        max_new_tokens=3,
    )
    return stack.wait(run_id)


def _results(stack: Stack, file_name: str) -> list[Result]:
    with session_scope(stack.database_url) as session:
        query = (
            select(Result)
            .join(Document, Document.id == Result.document_id)
            .where(Document.file_name == file_name)
            .order_by(Result.page_number)
        )
        return list(session.scalars(query))


def test_prefect_yaml_deploys_three_deployments_to_the_pool(stack: Stack):
    process, sweep, retry = (
        stack.deployments[n] for n in ("process-pdf", "sweep-inbox", "retry-failed")
    )
    for deployment in stack.deployments.values():
        assert deployment["work_pool_name"] == POOL
        assert deployment["pull_steps"] == []  # nothing baked in from the deploying host
        assert deployment["entrypoint"].startswith("vramflow.flows.")
    schema = process["parameter_openapi_schema"]
    assert schema["required"] == ["path"]
    # Not given: the worker's VRAMFLOW_MAX_NEW_TOKENS decides.
    assert {"type": "integer"} in schema["properties"]["max_new_tokens"]["anyOf"]
    assert schema["properties"]["max_new_tokens"]["default"] is None
    assert process["parameters"] == {} and sweep["parameters"] == {}
    assert process["schedules"] == []
    [every_10] = sweep["schedules"]
    assert (every_10["schedule"]["cron"], every_10["active"]) == ("*/10 * * * *", True)
    [nightly] = retry["schedules"]
    assert (nightly["schedule"]["cron"], nightly["active"]) == ("0 3 * * *", False)
    assert sweep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"


def test_a_run_triggered_through_the_api_stores_every_page_and_reports(
    stack: Stack, first_run: dict[str, Any]
):
    assert first_run["work_pool_name"] == POOL
    results = _results(stack, FIRST_PDF)
    assert [(r.page_number, r.status) for r in results] == [(p, "ok") for p in (1, 2, 3, 4)]
    assert {r.flow_run_id for r in results} == {first_run["id"]}
    artifacts = stack.artifacts(first_run["id"])
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert [a["data"] for a in progress] == [100.0]
    [summary] = [a for a in artifacts if (a["key"] or "").startswith("vramflow-summary-")]
    assert {"figure": "pages ok", "value": 4} in _table(summary)
    [pages] = [a for a in artifacts if (a["key"] or "").startswith("vramflow-pages-")]
    rows = _table(pages)
    assert [(row["page"], row["status"]) for row in rows] == [(p, "ok") for p in (1, 2, 3, 4)]
    assert all(row["attempts"] == 1 and row["peak memory"].endswith("RSS") for row in rows)
    [picture] = [a for a in artifacts if (a["key"] or "").startswith("vramflow-picture-")]
    assert picture["type"] == "markdown" and "](data:image/png;base64," in picture["data"]


def test_runs_import_the_installed_flows_not_the_deploying_folder(
    stack: Stack, first_run: dict[str, Any]
):
    """The deployments carry nothing of the folder they were deployed from (no path, no pull
    step), and the worker runs outside the checkout with no VRAMFLOW_REPO: its runs imported
    vramflow's flows by module from the installed package."""
    for deployment in stack.deployments.values():
        assert (deployment["path"], deployment["pull_steps"]) == (None, [])
    log = stack.worker_log.read_text(errors="replace")
    assert "Beginning flow run" in log and "pull step" not in log
    assert first_run["state"]["type"] == "COMPLETED"


def test_the_gpu_workers_metrics_show_the_calls_they_made(stack: Stack, first_run: dict[str, Any]):
    """Between them, the two GPU workers loaded the model and answered the first run's pages."""
    totals: dict[str, float] = {}
    for port in stack.metrics_ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("vramflow_") and " " in line:
                name, value = line.rsplit(" ", 1)
                totals[name] = totals.get(name, 0.0) + float(value)
    assert totals['vramflow_model_calls_total{outcome="ok"}'] >= 1
    assert totals["vramflow_pages_done_total"] >= 4
    assert totals["vramflow_tokens_out_total"] > 0
    assert totals["vramflow_slot_hold_seconds_count"] >= 1
    assert totals["vramflow_model_loads_total"] >= 1 and totals["vramflow_rss_bytes"] > 0


def _table(artifact: dict[str, Any]) -> list[dict[str, Any]]:
    data = artifact["data"]
    return json.loads(data) if isinstance(data, str) else data


def test_sweep_processes_a_new_file_and_skips_a_renamed_copy_of_a_known_one(
    stack: Stack, first_run: dict[str, Any]
):
    inbox = stack.root / "inbox"
    inbox.mkdir()
    shutil.copy(stack.root / "pdfs" / FIRST_PDF, inbox / "renamed-copy.pdf")
    shutil.copy(stack.root / "pdfs" / SWEEP_PDF, inbox / SWEEP_PDF)
    run_id = stack.trigger("sweep-inbox", inbox=str(inbox), model=stack.model, max_new_tokens=3)
    stack.wait(run_id)
    [table] = [a for a in stack.artifacts(run_id) if a["key"] == "vramflow-sweep-inbox"]
    outcomes = {row["file"]: row["outcome"] for row in _table(table)}
    assert outcomes == {SWEEP_PDF: "processed", "renamed-copy.pdf": "skipped"}
    assert [(r.page_number, r.status) for r in _results(stack, SWEEP_PDF)] == [(1, "ok")]
    # the known document was not run again
    assert {r.flow_run_id for r in _results(stack, FIRST_PDF)} == {first_run["id"]}


def test_two_runs_at_once_share_the_workers_but_never_the_device(stack: Stack):
    runs = [
        stack.trigger(
            "process-pdf",
            path=str(stack.root / "pdfs" / pdf),
            model=stack.model,
            max_new_tokens=3,
            batch_size=2,
        )
        for pdf in PAIR
    ]
    done = [stack.wait(run_id) for run_id in runs]
    (a_start, a_end), (b_start, b_end) = ((r["start_time"], r["end_time"]) for r in done)
    assert a_start < b_end and b_start < a_end, "the worker ran the two flow runs one by one"
    with session_scope(stack.database_url) as session:
        calls = session.execute(
            select(Attempt.call_id, Attempt.started_at, Attempt.finished_at, Attempt.hold_id)
            .where(Attempt.flow_run_id.in_(runs))
            .order_by(Attempt.started_at)
        ).all()
        holds = session.execute(
            select(SlotHold.acquired_at, SlotHold.released_at, SlotHold.pid)
            .where(SlotHold.hold_id.in_({c.hold_id for c in calls}))
            .order_by(SlotHold.acquired_at)
        ).all()
    # Holds of both GPU workers (one process each), never at once on the one device.
    _assert_disjoint([(h.acquired_at, h.released_at) for h in holds], "slot holds")
    by_call = {c.call_id: (c.started_at, c.finished_at) for c in calls}
    assert len(by_call) >= 5  # 5 + 6 pages in batches of 2
    _assert_disjoint(sorted(by_call.values()), "model calls")
    for pdf, run_id in zip(PAIR, runs, strict=True):
        results = _results(stack, pdf)
        assert results and {(r.status, r.flow_run_id) for r in results} == {("ok", run_id)}


def _assert_disjoint(intervals: list[tuple[datetime, datetime]], what: str) -> None:
    for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
        assert end <= start, f"{what} overlap on the one device: {intervals}"


def test_retry_failed_redoes_failed_and_stuck_pages_with_their_stored_settings(
    stack: Stack, first_run: dict[str, Any]
):
    """Page 2 failed; page 3 was left running two hours ago by a run that has ended."""
    long_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    with session_scope(stack.database_url) as session:
        rows = session.execute(
            select(Result.page_number, Result.id)
            .join(Document, Document.id == Result.document_id)
            .where(Document.file_name == FIRST_PDF)
        )
        ids = {page: result_id for page, result_id in rows}
        session.execute(
            update(Result)
            .where(Result.id == ids[2])
            .values(status="failed", error_type="InferenceOOMError", output=None)
        )
        session.execute(
            update(Result).where(Result.id == ids[3]).values(status="running", updated_at=long_ago)
        )
        session.execute(
            update(Document).where(Document.file_name == FIRST_PDF).values(status="partial")
        )
    run_id = stack.trigger("retry-failed")
    stack.wait(run_id)
    [table] = [a for a in stack.artifacts(run_id) if a["key"] == "vramflow-retry-failed"]
    assert [(row["file"], row["outcome"]) for row in _table(table)] == [(FIRST_PDF, "processed")]
    results = _results(stack, FIRST_PDF)
    assert [r.status for r in results] == ["ok"] * 4
    again = {r.flow_run_id for r in results if r.page_number in (2, 3)}
    assert len(again) == 1 and first_run["id"] not in again, "pages 2 and 3 were not run again"
    assert {r.flow_run_id for r in results if r.page_number in (1, 4)} == {first_run["id"]}
    with session_scope(stack.database_url) as session:
        status = session.scalar(select(Document.status).where(Document.file_name == FIRST_PDF))
    assert status == "done"


def test_eight_concurrent_triggers_are_all_accepted_on_postgres(stack: Stack):
    """On the documented server (PostgreSQL), simultaneous triggers are all answered at once,
    with no retry: on SQLite 7 of 8 such POSTs were answered 503. The runs are scheduled a day
    ahead, so the worker leaves them alone, and deleted afterwards."""
    deployment_id = stack.deployments["process-pdf"]["id"]
    later = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()
    body = {
        "parameters": {"path": str(stack.root / "pdfs" / FIRST_PDF)},
        "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}},
    }
    start = threading.Barrier(8)

    def trigger(_: int) -> httpx.Response:
        start.wait(timeout=30)  # all eight leave together
        return stack.api.post(f"deployments/{deployment_id}/create_flow_run", json=body)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(trigger, range(8)))
    try:
        assert [r.status_code for r in responses] == [201] * 8, [r.text for r in responses]
        assert len({r.json()["id"] for r in responses}) == 8
    finally:
        for response in responses:
            if response.status_code == 201:
                stack.api.delete(f"flow_runs/{response.json()['id']}")


def test_an_encrypted_file_without_its_password_fails_in_one_line(stack: Stack):
    """The run ends Failed with the reason; neither its logs nor the worker's show a traceback."""
    before = len(stack.worker_log.read_text(errors="replace"))
    run_id = stack.trigger("process-pdf", path=str(stack.root / "pdfs" / LOCKED_PDF))
    run = stack.wait(run_id, expect="FAILED")
    assert "locked.pdf is encrypted: pass its password" in run["state"]["message"]
    logs = stack.run_logs_with(run_id, "is encrypted: pass its password")
    assert "Traceback" not in logs
    # The worker's log is shared with other runs (a busy server's retries may log their own).
    since = stack.worker_log.read_text(errors="replace")[before:]
    assert _tracebacks_about(since, "ncrypt") == [], since


def _tracebacks_about(text: str, word: str) -> list[int]:
    """Lines where a traceback starts that mentions `word` within its next 60 lines."""
    lines = text.splitlines()
    return [
        n
        for n, line in enumerate(lines)
        if "Traceback" in line and any(word in later for later in lines[n : n + 60])
    ]
