"""How a process-pdf run ends and what it keeps: final states, settings, logs and passwords.

Under the session's Prefect test harness, with the tiny model built in the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from tests.support import flow_runs
from tests.support.flow_runs import DEMO, run_state
from vramflow.db import queries
from vramflow.db.models import Document, Result, SlotHold
from vramflow.db.schema import ensure_schema
from vramflow.db.session import session_scope
from vramflow.pdf import file_sha256

env = flow_runs.env  # the same fixture: a fresh vramflow home per test


def _flow_logs(run_id) -> list[str]:
    """Every log line of the flow run and its task runs, as the API has them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [log.message for log in logs]


def _encrypted_copy(path: Path, password: str) -> Path:
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=DEMO)
    writer.encrypt(user_password=password, algorithm="AES-256")
    with open(path, "wb") as handle:
        writer.write(handle)
    return path


def _broken_encryption(path: Path) -> Path:
    """An encrypted PDF whose encryption dictionary names a handler that does not exist."""
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=DEMO)
    writer.encrypt(user_password="x", algorithm="RC4-128")
    with open(path, "wb") as handle:
        writer.write(handle)
    path.write_bytes(path.read_bytes().replace(b"/Filter /Standard", b"/Filter /Bogus!!!", 1))
    return path


def test_a_document_with_failed_pages_ends_failed_and_retry_failed_finds_it(
    env, tiny_model_dir, monkeypatch
):
    from vramflow.flows.retry_failed import retry_failed

    monkeypatch.setenv("VRAMFLOW_INJECT_OOM", "page=2,times=all")
    state = run_state(tiny_model_dir)
    assert state.is_failed(), state
    assert state.message.startswith("demo.pdf: 1 of 6 pages failed (page 2: ")
    assert "out of memory" in state.message
    summary = state.result(raise_on_failure=False)
    assert summary["status"] == "partial" and summary["pages_ok"] == 5
    monkeypatch.delenv("VRAMFLOW_INJECT_OOM")
    planned = retry_failed(dry_run=True)
    assert [(o["file"], o["outcome"]) for o in planned["outcomes"]] == [("demo.pdf", "skipped")]
    assert "dry run: failed, partial; pages 2" in planned["outcomes"][0]["detail"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: _encrypted_copy(tmp / "locked.pdf", "s3cret"), "is encrypted: pass its"),
        (lambda tmp: (tmp / "b.pdf").write_bytes(b"%PDF-1.7\n garbage") and tmp / "b.pdf", ""),
        (lambda tmp: _broken_encryption(tmp / "c.pdf"), "only Standard PDF encryption handler"),
    ],
)
def test_an_expected_document_failure_logs_one_line_and_no_traceback(
    env, tiny_model_dir, tmp_path, make, message
):
    path = make(tmp_path)
    state = run_state(tiny_model_dir, path=str(path))
    assert state.is_failed() and message in state.message
    logs = _flow_logs(state.state_details.flow_run_id)
    assert any(state.message in line for line in logs), logs
    assert not any("Traceback" in line for line in logs), "\n".join(logs)


def test_a_refused_run_leaves_a_done_document_as_it_was(env):
    ensure_schema(env)
    with session_scope(env) as session:
        document_id = queries.record_document(
            session,
            sha256=file_sha256(DEMO),
            path=str(DEMO),
            file_name=DEMO.name,
            size_bytes=DEMO.stat().st_size,
            page_count=6,
            status="done",
        )
    for bad in ({"pages": "9-3"}, {"prompt": " "}, {"batch_size": 0}):
        state = run_state(None, **bad)
        assert state.is_failed() and state.message, bad
        with session_scope(env) as session:
            assert session.get(Document, document_id).status == "done", bad


def test_settings_not_given_come_from_the_environment(env, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VRAMFLOW_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("VRAMFLOW_PROMPT", "Name the subject of this page.")
    monkeypatch.setenv("VRAMFLOW_MAX_NEW_TOKENS", "2")
    monkeypatch.setenv("VRAMFLOW_BATCH_SIZE", "3")
    state = run_state(None, pages="1-3", max_new_tokens=None, batch_size=None)
    assert state.is_completed(), state.message
    with session_scope(env) as session:
        results = session.scalars(select(Result)).all()
        holds = session.scalars(select(SlotHold)).all()
    assert {r.model_id for r in results} == {str(tiny_model_dir.resolve())}
    assert {r.prompt for r in results} == {"Name the subject of this page."}
    assert {json.loads(r.settings_json)["max_new_tokens"] for r in results} == {2}
    assert {r.tokens_out for r in results} == {2}
    assert len(holds) == 1  # three pages in one batch of three


def _prefect_database_files() -> list[Path]:
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url.get_secret_value()
    database = Path(url.split("///", 1)[1])
    return sorted(database.parent.glob(database.name + "*"))  # with its -wal and -shm


def test_a_password_is_stored_nowhere(env, tiny_model_dir, tmp_path):
    """Neither Prefect (database, logs, flow-run and task-run parameters) nor vramflow's
    database keeps the password, given as a SecretStr or through a Secret block."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    given, in_block = "given-pw-5f1c9a", "block-pw-7d2e4b"
    first = run_state(
        tiny_model_dir,
        path=str(_encrypted_copy(tmp_path / "a.pdf", given)),
        password=SecretStr(given),
        pages="1",
    )
    Secret(value=in_block).save("vramflow-test-pdf-password", overwrite=True)
    second = run_state(
        tiny_model_dir,
        path=str(_encrypted_copy(tmp_path / "b.pdf", in_block)),
        password_secret="vramflow-test-pdf-password",
        pages="1",
    )
    assert first.is_completed() and second.is_completed(), (first.message, second.message)
    runs = [first.state_details.flow_run_id, second.state_details.flow_run_id]
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs))
        )
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs))
        )
    by_id = {run.id: run for run in flow_runs}
    assert by_id[runs[0]].parameters["password"] == "**********"
    assert by_id[runs[1]].parameters["password_secret"] == "vramflow-test-pdf-password"
    seen = [run.model_dump_json() for run in [*flow_runs, *task_runs]]
    seen += _flow_logs(runs[0]) + _flow_logs(runs[1])
    assert any("open-document" in text for text in seen)  # the task runs were read
    stored = [path.read_bytes() for path in _prefect_database_files()]
    stored.append(Path(env.removeprefix("sqlite:///")).read_bytes())
    for secret in (given, in_block):
        assert not any(secret in text for text in seen), secret
        # The Secret block keeps its value encrypted; nothing else has it at all.
        assert not any(secret.encode() in data for data in stored), secret


def test_the_sweep_still_counts_a_partial_document_as_processed():
    from prefect.states import Failed

    from vramflow.tasks.outcomes import outcome_of_run

    partial = {"status": "partial", "pages_ok": 5, "pages_failed": 1}
    outcome = outcome_of_run("a.pdf", Failed(message="a.pdf: 1 of 6 pages failed", data=partial))
    assert (outcome.outcome, outcome.detail) == ("processed", "partial: 5 ok, 1 failed")
    refused = outcome_of_run("b.pdf", Failed(message="b.pdf is encrypted: pass its password"))
    assert (refused.outcome, refused.detail) == (
        "failed",
        "Failed: b.pdf is encrypted: pass its password",
    )
