"""Flow: process every PDF in the inbox folder that no run has finished yet, one subflow each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from vramflow.flows.many_documents import DocumentJob, process_documents
from vramflow.flows.process_pdf import build_settings
from vramflow.runs import validate_prompt
from vramflow.tasks.inbox import scan_inbox
from vramflow.tasks.outcomes import OUTCOMES, Outcome, publish_outcomes


def _run_name() -> str:
    inbox = flow_run.parameters.get("inbox")
    return f"sweep-{Path(inbox).name if inbox else 'inbox'}"


@flow(name="sweep-inbox", flow_run_name=_run_name, log_prints=True)
def sweep_inbox(
    inbox: str | None = None,
    prompt: str | None = None,
    model: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    max_input_tokens: int | None = None,
    documents_at_once: int | None = None,
) -> dict[str, Any]:
    """Run `process-pdf` on each new *.pdf in the inbox; files whose bytes were already processed
    with this model, prompt and generation settings are skipped, whatever their name.

    Args:
        inbox: Folder to scan (default: VRAMFLOW_INBOX on the worker, else VRAMFLOW_HOME/inbox).
        prompt: Instruction applied to every page (default: VRAMFLOW_PROMPT on the worker).
        model: The packaged default, a Hugging Face id, a local folder or a .gguf file
            (default: VRAMFLOW_MODEL on the worker).
        max_new_tokens: Tokens generated per page (default: VRAMFLOW_MAX_NEW_TOKENS).
        batch_size: Pages per model call and GPU slot hold (default: VRAMFLOW_BATCH_SIZE).
        max_input_tokens: Page tokens kept (default: VRAMFLOW_MAX_INPUT_TOKENS).
        documents_at_once: Documents processed side by side (default:
            VRAMFLOW_DOCUMENTS_AT_ONCE, 2); their batches still take the GPU slot one by one.
    """
    settings = build_settings(
        inbox=inbox,
        prompt=prompt,
        model=model,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_input_tokens=max_input_tokens,
        documents_at_once=documents_at_once,
    )
    validate_prompt(settings)
    skipped, jobs = [], []
    for file in scan_inbox(str(settings.inbox_dir), settings):
        if file.status != "new":
            skipped.append(Outcome(file.name, "skipped", f"{file.status}: {file.detail}"))
            continue
        parameters = {
            "path": file.path,
            "prompt": settings.prompt,
            "model": settings.model,
            "max_new_tokens": settings.max_new_tokens,
            "batch_size": settings.batch_size,
            "max_input_tokens": settings.max_input_tokens,
        }
        jobs.append(DocumentJob(file.name, parameters))
    outcomes = skipped + process_documents(jobs, settings.documents_at_once)
    title, database = f"Sweep of {settings.inbox_dir}", settings.resolved_database_url
    summary = publish_outcomes(title, "vramflow-sweep-inbox", outcomes, database)
    counts = ", ".join(f"{len(summary[kind])} {kind}" for kind in OUTCOMES)
    get_run_logger().info("sweep of %s: %s", settings.inbox_dir, counts)
    return summary
