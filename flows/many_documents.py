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

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from vramflow.flows.process_pdf import process_pdf
from vramflow.tasks.outcomes import Outcome, failed_outcome, outcome_of_run


@dataclass(frozen=True)
class DocumentJob:
    """One `process-pdf` run to make: the file's name (for the outcome) and the parameters."""

    name: str
    parameters: dict[str, Any]


# A task, so that the subflows of one sweep can run side by side in the task runner's threads
# (Prefect runs a flow called inside a task as a subflow of the caller, linked to that task).
@task(name="process-document", task_run_name="process {job.name}", cache_policy=NO_CACHE)
def process_document(job: DocumentJob) -> Outcome:
    """Run `process-pdf` for one document; its outcome, whatever the subflow's final state."""
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
