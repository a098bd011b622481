"""Many documents at once: how many process_documents runs together, and the sweep-inbox
flow over a folder of good and broken PDFs."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tests.support import flow_runs
from tests.support.flow_runs import DEMO
from tests.support.intervals import max_concurrency, stored_call_intervals, stored_hold_intervals
from vramflow.db.models import Result
from vramflow.db.session import session_scope

env = flow_runs.env  # a fresh vramflow home per test


@pytest.mark.parametrize("documents_at_once", [1, 2])
def test_process_documents_runs_at_most_documents_at_once_together(
    prefect_harness, monkeypatch, documents_at_once
):
    """A plain coroutine stands in for process-pdf here: whether real subflows overlap also
    depends on how fast the server creates their runs, and this is about how many the sweep
    lets run."""
    import threading

    from prefect import flow
    from prefect.states import Completed

    from vramflow.flows import many_documents

    lock, running, most = threading.Lock(), [0], [0]
    together = threading.Barrier(documents_at_once, timeout=60)

    async def stand_in(path: str, return_state: bool) -> Completed:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        together.wait()  # with 2 at once, passes only when two documents are running
        with lock:
            running[0] -= 1
        return Completed(data={"status": "done", "pages_ok": 1, "pages_failed": 0})

    @flow
    def sweep_of_stand_ins() -> list:
        jobs = [many_documents.DocumentJob(f"{n}.pdf", {"path": f"{n}.pdf"}) for n in range(4)]
        return many_documents.process_documents(jobs, documents_at_once)

    monkeypatch.setattr(many_documents, "process_pdf", stand_in)
    outcomes = sweep_of_stand_ins()
    assert [(o.file, o.outcome) for o in outcomes] == [(f"{n}.pdf", "processed") for n in range(4)]
    assert most[0] == documents_at_once


def test_a_document_whose_subflow_the_api_could_not_create_is_tried_again(
    prefect_harness, monkeypatch
):
    """A 503 from the Prefect API (a server on SQLite, busy) that outlasts the client's own
    retries fails creating the subflow: the document is tried again. Its own errors are not."""
    import httpx
    from prefect import flow
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Completed

    from vramflow.flows import many_documents

    calls: dict[str, int] = {}

    async def stand_in(path: str, return_state: bool) -> Completed:
        calls[path] = calls.get(path, 0) + 1
        if path == "busy.pdf" and calls[path] == 1:
            request = httpx.Request("POST", "http://127.0.0.1/api/task_runs/")
            response = httpx.Response(503, request=request, json={"exception_message": "busy"})
            error = httpx.HTTPStatusError("503", request=request, response=response)
            raise PrefectHTTPStatusError.from_httpx_error(error)
        if path == "bug.pdf":
            raise RuntimeError("a fault of the document's own")
        return Completed(data={"status": "done", "pages_ok": 1, "pages_failed": 0})

    @flow
    def sweep_of_stand_ins() -> list:
        jobs = [many_documents.DocumentJob(n, {"path": n}) for n in ("busy.pdf", "bug.pdf")]
        return many_documents.process_documents(jobs, 2)

    monkeypatch.setattr(many_documents, "process_pdf", stand_in)
    no_delay = many_documents.process_document.with_options(retry_delay_seconds=0)
    monkeypatch.setattr(many_documents, "process_document", no_delay)
    outcomes = sweep_of_stand_ins()
    assert [(o.file, o.outcome) for o in outcomes] == [
        ("busy.pdf", "processed"),
        ("bug.pdf", "failed"),
    ]
    assert calls == {"busy.pdf": 2, "bug.pdf": 1}
    assert "a fault of the document's own" in outcomes[1].detail


def test_sweep_runs_documents_side_by_side_and_the_model_one_batch_at_a_time(
    env, tiny_model_dir, tmp_path
):
    from vramflow.demo.pdfgen import write_text_pdf
    from vramflow.flows.sweep_inbox import sweep_inbox

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a-demo.pdf").write_bytes(DEMO.read_bytes())
    write_text_pdf(inbox / "b-notes.pdf", [f"Note {n}: the pump was serviced." for n in range(5)])
    (inbox / "c-broken.pdf").write_bytes(b"%PDF-1.7\nnot really a PDF")
    summary = sweep_inbox(
        inbox=str(inbox),
        model=str(tiny_model_dir),
        max_new_tokens=3,
        batch_size=2,
        documents_at_once=2,
    )
    assert summary["processed"] == ["a-demo.pdf", "b-notes.pdf"]
    assert summary["failed"] == ["c-broken.pdf"]
    [broken] = [o for o in summary["outcomes"] if o["file"] == "c-broken.pdf"]
    assert "not a readable PDF" in broken["detail"]
    with session_scope(env) as session:
        pages = session.execute(select(Result.status, func.count()).group_by(Result.status)).all()
    assert dict(pages) == {"ok": 11}
    calls = stored_call_intervals(env)
    assert list(calls) == ["cpu"] and max_concurrency(calls["cpu"]) == 1
    assert max_concurrency(stored_hold_intervals(env)) == 1


def test_the_task_that_runs_a_document_pickles():
    """A document's batches go to GPU workers with the running task's context, which Prefect
    pickles together with the task's function and the globals it names."""
    import cloudpickle

    from vramflow.flows.many_documents import process_document

    assert cloudpickle.loads(cloudpickle.dumps(process_document)).name == "process-document"
