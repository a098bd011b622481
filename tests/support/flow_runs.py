"""Run the process-pdf flow in this process over the demo PDF, under the session's Prefect test
harness, and read back what it stored: shared by the flow test modules."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from vramflow.db.models import Attempt, Result
from vramflow.db.session import session_scope

DEMO = Path(__file__).resolve().parents[2] / "vramflow" / "demo" / "demo.pdf"


@pytest.fixture
def env(tmp_path, monkeypatch, prefect_harness):
    """A fresh vramflow home (SQLite database) for each test; fast OOM retries."""
    monkeypatch.setenv("VRAMFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VRAMFLOW_OOM_RETRY_DELAY_SECONDS", "0")
    monkeypatch.setenv("VRAMFLOW_OOM_RETRIES", "1")
    monkeypatch.delenv("VRAMFLOW_INJECT_OOM", raising=False)
    monkeypatch.delenv("VRAMFLOW_DATABASE_URL", raising=False)
    return f"sqlite:///{tmp_path / 'home' / 'vramflow.db'}"


def run_state(model_dir: Path | None, task_workers: int | None = None, **params):
    """The flow's final state over the demo PDF; `task_workers=1` runs its tasks one at a time,
    in order. `model_dir` None leaves the model to VRAMFLOW_MODEL."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from vramflow.flows.process_pdf import process_pdf

    flow = process_pdf
    if task_workers:
        flow = process_pdf.with_options(task_runner=ThreadPoolTaskRunner(task_workers))
    values = {"path": str(DEMO), "max_new_tokens": 3, "batch_size": 4}
    if model_dir is not None:
        values["model"] = str(model_dir)
    return asyncio.run(flow(**{**values, **params}, return_state=True))


def run(model_dir: Path | None, task_workers: int | None = None, **params):
    """The flow's summary; a run with failed pages ends Failed and still carries it."""
    state = run_state(model_dir, task_workers, **params)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), f"{state.name}: {state.message}"
    assert state.is_completed() == (summary["pages_failed"] == 0), state
    return summary


def attempts_of(url: str, page: int) -> list[tuple[str, int]]:
    with session_scope(url) as session:
        rows = session.execute(
            select(Attempt.outcome, Attempt.batch_size)
            .join(Result, Attempt.result_id == Result.id)
            .where(Result.page_number == page)
            .order_by(Attempt.id)
        )
        return [tuple(row) for row in rows]
