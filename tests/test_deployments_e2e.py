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
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from tests.support.deployment_stack import (
    FIRST_PDF,
    LOCKED_PDF,
    PAIR,
    POOL,
    SWEEP_PDF,
    Stack,
    running_stack,
)
from tests.support.servers import PrefectServer
from vramflow.db.models import Attempt, Document, Result, SlotHold
from vramflow.db.session import session_scope

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture(scope="module")
def stack(
    prefect_server_on_postgres: PrefectServer,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """One stack for every test here, started once."""
    root = tmp_path_factory.mktemp("deployments")
    with running_stack(prefect_server_on_postgres, tiny_model_dir, root) as started:
        yield started


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
    details = [row["detail"] for row in _table(table)]
    assert outcomes == {SWEEP_PDF: "processed", "renamed-copy.pdf": "skipped"}, details
    # one picture, the sweep's; the document's run drew none of its own
    [picture] = [a for a in stack.artifacts(run_id) if a["key"] == "vramflow-sweep-inbox-picture"]
    assert "data:image/png;base64," in picture["data"]
    [document_run] = [row["flow_run_id"] for row in _table(table) if row["file"] == SWEEP_PDF]
    assert f"--run {document_run}" in picture["data"]
    document_keys = [a["key"] or "" for a in stack.artifacts(document_run)]
    assert any(key.startswith("vramflow-pages-") for key in document_keys)
    assert not any(key.startswith("vramflow-picture-") for key in document_keys)
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
