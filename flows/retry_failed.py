"""Flow: run `process-pdf` again for documents with failed, stuck or missing pages."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.process_pdf import build_settings, process_pdf
from tasks.outcomes import Outcome, outcome_of_run, publish_outcomes
from tasks.retries import plan_retries


@flow(name="retry-failed", flow_run_name="retry-failed", log_prints=True)
def retry_failed(
    stuck_after_minutes: float = 60,
    max_attempts: int = 10,
    batch_size: int | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Redo failed pages (out of memory, time limit), pages left running by a run that is gone,
    and partial documents, with the model, prompt and generation settings stored with them.

    Args:
        stuck_after_minutes: A page still running this long after its run claimed it is stuck,
            unless the Prefect API shows that run as still active.
        max_attempts: Pages with this many model calls already are left alone.
        batch_size: Pages per model call and GPU slot hold (default: VRAMFLOW_BATCH_SIZE).
        dry_run: Only list what would run again.
    """
    settings = build_settings(batch_size=batch_size)
    jobs, outcomes = plan_retries(settings, stuck_after_minutes, max_attempts)
    for job in jobs:
        why = f"{', '.join(job.reasons)}; pages {', '.join(map(str, job.pages)) or 'all'}"
        if dry_run:
            outcomes.append(Outcome(job.file_name, "skipped", f"dry run: {why}"))
            continue
        get_run_logger().info("%s: running again (%s)", job.file_name, why)
        state = process_pdf(
            path=job.path,
            prompt=job.prompt,
            model=job.model_id,
            max_new_tokens=job.settings.get("max_new_tokens", settings.max_new_tokens),
            max_input_tokens=job.settings.get("max_input_tokens", settings.max_input_tokens),
            batch_size=settings.batch_size,
            return_state=True,
        )
        outcomes.append(outcome_of_run(job.file_name, state))
    return publish_outcomes("Retry of failed pages", "vramflow-retry-failed", outcomes)
