"""Run `process-pdf` over many documents, a few at a time, as subflows of the calling flow.

Each document has a fixed cost outside the GPU slot: creating its flow run, opening the file and
extracting the first batch before its first hold, and recording, publishing and Prefect's own
teardown after its last. Run one after another, the GPU idles through all of it. With two or
more documents at once, one document's start and end overlap another's inference; their batches
still take the slot one at a time (and hand it over inside this process), so this adds no
concurrent model calls.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from vramflow.flows.process_pdf import process_pdf
from vramflow.tasks.outcomes import Outcome, failed_outcome, outcome_of_run
from vramflow.tasks.run_report import picture_drawn_by_caller


@dataclass(frozen=True)
class DocumentJob:
    """One `process-pdf` run to make: the file's name (for the outcome) and the parameters."""

    name: str
    parameters: dict[str, Any]


# Seconds before a document whose subflow the Prefect API could not create is tried again.
API_RETRY_DELAY_S = 10


def prefect_api_unavailable(error: object) -> bool:
    """Whether `error` says the Prefect API could not answer (a 5xx, or no connection), as a
    server on SQLite answers 503 while its database is busy, even after the client's retries."""
    if isinstance(error, PrefectHTTPStatusError):
        return error.response.status_code >= 500
    return isinstance(error, httpx.TransportError)


def _subflow_not_created(_task: Task, _run: TaskRun, state: State) -> bool:
    # The task's state holds the exception it raised. A subflow that ran returns its own state
    # instead of raising, so only a run the API could not create or start comes here; trying it
    # again is safe because pages already answered are skipped by their result keys.
    return prefect_api_unavailable(state.data)


# A task, so that the subflows of one sweep can run side by side in the task runner's threads
# (Prefect runs a flow called inside a task as a subflow of the caller, linked to that task).
@task(
    name="process-document",
    task_run_name="process {job.name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=API_RETRY_DELAY_S,
    retry_condition_fn=_subflow_not_created,
)
def process_document(job: DocumentJob) -> Outcome:
    """Run `process-pdf` for one document; its outcome, whatever the subflow's final state.
    The calling flow draws one picture of all its documents, so this one draws none."""
    with picture_drawn_by_caller():
        # `process_pdf` is an async flow; this thread has no event loop of its own.
        state = asyncio.run(process_pdf(**job.parameters, return_state=True))
    return outcome_of_run(job.name, state)


def process_documents(jobs: list[DocumentJob], documents_at_once: int) -> list[Outcome]:
    """Run every job with at most `documents_at_once` running; outcomes in the order of `jobs`."""
    if not jobs:
        return []
    with ThreadPoolTaskRunner(max_workers=documents_at_once) as runner:
        futures = [runner.submit(process_document, {"job": job}) for job in jobs]
        outcomes = []
        for job, future in zip(jobs, futures, strict=True):
            future.wait()
            state = future.state
            if state.is_completed():
                outcomes.append(state.result())
            else:  # the task itself broke, outside the subflow (which never raises here)
                outcomes.append(failed_outcome(job.name, state))
    return outcomes
