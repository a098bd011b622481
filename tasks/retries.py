"""Prefect task: find the documents whose pages need another run, and check each can have one."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from vramflow.config import Settings
from vramflow.db import maintenance
from vramflow.db.maintenance import RetryJob, RetryRow
from vramflow.db.schema import ensure_schema
from vramflow.db.session import session_scope
from vramflow.runs import key_parts
from vramflow.tasks.outcomes import Outcome

_API_PAGE = 200


@task(name="plan-retries", cache_policy=NO_CACHE)
def plan_retries(
    settings: Settings, stuck_after_minutes: float, max_attempts: int
) -> tuple[list[RetryJob], list[Outcome]]:
    """Jobs for failed results, results `running` for longer than `stuck_after_minutes` whose
    flow run is no longer active, and partial documents; and the documents that cannot be run."""
    ensure_schema(settings.resolved_database_url)
    claimed_before = datetime.now(timezone.utc) - timedelta(minutes=stuck_after_minutes)
    with session_scope(settings.resolved_database_url) as session:
        running = maintenance.stuck_results(session, claimed_before)
        rows = maintenance.failed_results(session, max_attempts)
        rows += maintenance.partial_documents(session)
    stuck = _without_active_runs(running)  # asks the Prefect API, outside any transaction
    with session_scope(settings.resolved_database_url) as session:
        jobs = maintenance.retry_jobs(session, rows + stuck)
    runnable, refused = [], []
    for job in jobs:
        problem = _why_not(job, settings)
        if problem:
            refused.append(Outcome(job.file_name, "skipped", problem))
        else:
            runnable.append(job)
    get_run_logger().info(
        "%d documents to run again, %d that cannot be (%d stuck results)",
        len(runnable),
        len(refused),
        len(stuck),
    )
    return runnable, refused


def _without_active_runs(rows: list[RetryRow]) -> list[RetryRow]:
    """Drop rows whose flow run the Prefect API still shows as not finished (it may be waiting
    for the GPU slot); rows of runs it does not know, or that ended, are stuck."""
    ids = sorted({run_id for r in rows if (run_id := _uuid(r.flow_run_id)) is not None})
    active = {str(run.id) for run in _read_flow_runs(ids) if not _final(run)}
    return [replace(r, status="stuck") for r in rows if r.flow_run_id not in active]


def _read_flow_runs(ids: list[UUID]) -> list:
    if not ids:
        return []
    runs = []
    with get_client(sync_client=True) as client:
        for start in range(0, len(ids), _API_PAGE):  # the API returns at most 200 a call
            chunk = ids[start : start + _API_PAGE]
            flow_run_filter = FlowRunFilter(id=FlowRunFilterId(any_=chunk))
            runs += client.read_flow_runs(flow_run_filter=flow_run_filter, limit=len(chunk))
    return runs


def _final(run) -> bool:
    return run.state is not None and run.state.is_final()


def _uuid(text: str | None) -> UUID | None:
    try:
        return UUID(text) if text else None
    except ValueError:
        return None


def _why_not(job: RetryJob, settings: Settings) -> str | None:
    """Why `process-pdf` cannot redo this job here, or None."""
    if not Path(job.path).is_file():
        return f"file gone: {job.path}"
    if job.encrypted:
        return "encrypted: run process-pdf on it again with its password"
    same = settings.model_copy(
        update={
            "model": job.model_id,
            "prompt": job.prompt,
            "max_new_tokens": job.settings.get("max_new_tokens", settings.max_new_tokens),
            "max_input_tokens": job.settings.get("max_input_tokens", settings.max_input_tokens),
        }
    )
    if key_parts(same) != (job.model_id, job.prompt_hash, job.settings_hash):
        return f"stored generation settings {job.settings} cannot be reproduced here"
    return None
