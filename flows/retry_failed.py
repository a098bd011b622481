"""Flow: run `process-pdf` again for documents with failed, stuck or missing pages."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from vramflow.flows.many_documents import DocumentJob, process_documents
from vramflow.flows.process_pdf import build_settings
from vramflow.tasks.outcomes import Outcome, publish_outcomes
from vramflow.tasks.retries import plan_retries


@flow(name="retry-failed", flow_run_name="retry-failed", log_prints=True)
def retry_failed(
    stuck_after_minutes: float = 60,
    max_attempts: int = 10,
    batch_size: int | None = None,
    dry_run: bool = False,
    documents_at_once: int | None = None,
) -> dict[str, Any]:
    """Redo failed pages (out of memory, time limit), pages left running by a run that is gone,
    and partial documents, with the model, prompt and generation settings stored with them.

    Args:
        stuck_after_minutes: A page still running this long after its run claimed it is stuck,
            unless the Prefect API shows that run as still active.
        max_attempts: Pages with this many model calls already are left alone.
        batch_size: Pages per model call and GPU slot hold (default: VRAMFLOW_BATCH_SIZE).
        dry_run: Only list what would run again.
        documents_at_once: Documents run again side by side (default:
            VRAMFLOW_DOCUMENTS_AT_ONCE, 2); their batches still take the GPU slot one by one.
    """
    settings = build_settings(batch_size=batch_size, documents_at_once=documents_at_once)
    jobs, outcomes = plan_retries(settings, stuck_after_minutes, max_attempts)
    runs = []
    for job in jobs:
        why = f"{', '.join(job.reasons)}; pages {', '.join(map(str, job.pages)) or 'all'}"
        if dry_run:
            outcomes.append(Outcome(job.file_name, "skipped", f"dry run: {why}"))
            continue
        get_run_logger().info("%s: running again (%s)", job.file_name, why)
        parameters = {
            "path": job.path,
            "prompt": job.prompt,
            "model": job.model_id,
            "max_new_tokens": job.settings.get("max_new_tokens", settings.max_new_tokens),
            "max_input_tokens": job.settings.get("max_input_tokens", settings.max_input_tokens),
            "batch_size": settings.batch_size,
        }
        runs.append(DocumentJob(job.file_name, parameters))
    # Runs of one model next to each other: two documents at once with different models would
    # move weights on and off the device at every hand-over of the slot.
    runs.sort(key=lambda run: run.parameters["model"])
    outcomes += process_documents(runs, settings.documents_at_once)
    return publish_outcomes(
        "Retry of failed pages", "vramflow-retry-failed", outcomes, settings.resolved_database_url
    )
