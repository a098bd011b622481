"""Flow: one PDF → extracted pages → model answers per page, with the GPU slot held per batch.

The flow is async for one reason: Prefect's engine joins a sync flow's heartbeat thread on exit,
and that thread sleeps in whole seconds, so every sync run ended up to a second late (about 0.85 s
for a short document on Prefect 3.9). The async engine does not wait for it. Tasks stay
synchronous and run in the task runner's threads; the flow hands its own blocking work (the
database, waiting on futures) to threads so that its event loop is never held up. From
synchronous code, run it with `asyncio.run(process_pdf(...))`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from prefect import State, flow, get_run_logger
from prefect.blocks.system import Secret
from prefect.context import SyncClientContext
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import SecretStr

from vramflow.config import Settings, resolve_settings
from vramflow.db import queries
from vramflow.db.session import session_scope
from vramflow.errors import ConfigError, DocumentError
from vramflow.extraction_budget import ExtractionBudget
from vramflow.runs import check_page_range, key_parts, parse_page_range, validate_prompt
from vramflow.tasks.dispatch import BatchRun, start_batch
from vramflow.tasks.documents import open_document
from vramflow.tasks.extract import extract_page
from vramflow.tasks.infer import infer_batch
from vramflow.tasks.report import ProgressReport, publish_summary
from vramflow.tasks.run_report import publish_run_report

# Batches in flight per document, counting the one being answered. Two keep the device busy
# when extracting a batch takes less time than inferring one; the third is slack for pages
# that are slow to extract.
BATCHES_IN_FLIGHT = 3


def _run_name() -> str:
    return f"pdf-{Path(flow_run.parameters['path']).name}"


def build_settings(**overrides: Any) -> Settings:
    """Environment settings with this run's parameters on top (None: not given)."""
    return resolve_settings(**overrides)


@flow(
    name="process-pdf",
    flow_run_name=_run_name,
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=8),
)
async def process_pdf(
    path: str,
    prompt: str | None = None,
    model: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    password: SecretStr | None = None,
    password_secret: str | None = None,
    pages: str | None = None,
    force: bool = False,
    max_input_tokens: int | None = None,
) -> dict[str, Any] | State:
    """Run the prompt over the pages of the PDF at `path` and store an answer per page.

    The run ends Failed, with the reason in its message, when the document cannot be opened or
    any of its pages failed; the summary is still its result.

    Args:
        path: The PDF, a path on the host that runs the flow.
        prompt: Instruction applied to every page (default: VRAMFLOW_PROMPT).
        model: The packaged default, a Hugging Face id, a local folder or a .gguf file
            (default: VRAMFLOW_MODEL).
        max_new_tokens: Tokens generated per page (default: VRAMFLOW_MAX_NEW_TOKENS).
        batch_size: Pages per batch sent to the model; a model call may also carry pages of
            other runs (default: VRAMFLOW_BATCH_SIZE).
        password: Password of an encrypted PDF. Prefect stores it as "**********" when the
            flow is called from Python; from the UI or the REST API use `password_secret`.
        password_secret: Name of a Prefect Secret block holding the password.
        pages: Page range such as "1-5,8" or "10-" (default: every page).
        force: Redo pages already done for this model, prompt and settings.
        max_input_tokens: Page tokens kept; longer pages are truncated
            (default: VRAMFLOW_MAX_INPUT_TOKENS).
    """
    logger = get_run_logger()
    try:
        # Everything a bad parameter can break is checked before the document is touched: a
        # refused run leaves a finished document as it was.
        settings = build_settings(
            prompt=prompt,
            model=model,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_input_tokens=max_input_tokens,
        )
        validate_prompt(settings)
        check_page_range(pages)
        secret = await read_password(password, password_secret)
    except ConfigError as exc:
        logger.error("%s", exc)
        return Failed(message=str(exc))
    # Task runs take their API client from the context they were submitted in. A sync flow
    # leaves its client there; an async flow does not, and every task run would then build and
    # check a client of its own, which delayed the first extraction by 0.2 s in a 16-page run.
    with SyncClientContext.get_or_create():
        try:
            summary = await _process_document(path, secret, pages, force, settings)
        except DocumentError as exc:  # bad input, already logged in one line: no traceback
            return Failed(message=str(exc))
    return final_state(summary)


async def read_password(password: SecretStr | None, secret_block: str | None) -> SecretStr | None:
    """The password given, or the value of the Prefect Secret block named `secret_block`."""
    if secret_block is None:
        return password
    if password is not None:
        raise ConfigError("give either password or password_secret, not both")
    try:
        block = await Secret.aload(secret_block)
    except ValueError as exc:
        raise ConfigError(f"no Prefect Secret block named {secret_block!r} ({exc})") from None
    return SecretStr(str(block.get()))


def final_state(summary: dict[str, Any]) -> dict[str, Any] | State:
    """The summary; wrapped in a Failed state (so the UI and automations see it) when any page
    failed. `retry-failed` finds such documents in the database, not by this state."""
    failed = summary["pages_failed"]
    if not failed:
        return summary
    pages = failed + summary["pages_ok"] + summary["pages_no_text"]
    reasons = "; ".join(f"page {page}: {error}" for page, error in summary["errors"][:3])
    more = " ..." if len(summary["errors"]) > 3 else ""
    message = f"{summary['file']}: {failed} of {pages} pages failed ({reasons}{more})"
    return Failed(message=message[:1000], data=summary)


@dataclass
class DocumentPlan:
    """An opened document and the pages this run has to answer."""

    document_id: int
    key: queries.ResultKey
    budget: ExtractionBudget
    todo: list[int]
    extracted: set[int]
    already_done: int


async def _process_document(
    path: str, password: SecretStr | None, pages: str | None, force: bool, settings: Settings
) -> dict[str, Any]:
    """Open the file, extract and infer its pages batch by batch, and publish the summary."""
    plan = await _open(path, password, pages, force, settings)
    # The progress artifact is created while the first batches are extracted, not before.
    starting_report = asyncio.ensure_future(ProgressReport.start(Path(path).name, len(plan.todo)))
    await _answer_pages(plan, path, password, force, settings, starting_report)
    report = await starting_report
    # The last progress update goes out while the summary is made and published.
    summary, _ = await asyncio.gather(_finish(plan, path, settings), report.close())
    get_run_logger().info(
        "%s: %s (%d ok, %d failed, %d without text)",
        summary["file"],
        summary["status"],
        summary["pages_ok"],
        summary["pages_failed"],
        summary["pages_no_text"],
    )
    return summary


async def _open(
    path: str, password: SecretStr | None, pages: str | None, force: bool, settings: Settings
) -> DocumentPlan:
    """Open the document and find which of the asked pages are still to do."""
    opening = time.monotonic()
    opened = await asyncio.to_thread(open_document, path, password, settings)
    document_id, page_count = opened.unwrap()
    # The document's extraction time limit: opening it counts, waiting for the model does not.
    budget = ExtractionBudget(settings.document_timeout_seconds, time.monotonic() - opening)
    numbers = parse_page_range(pages, page_count)
    key = queries.ResultKey(document_id, *key_parts(settings))
    extracted, already = await asyncio.to_thread(
        _pages_on_record, settings, key, set(numbers), force
    )
    if already:
        get_run_logger().info(
            "%d of %d pages already done for this model and prompt: skipped",
            len(already),
            len(numbers),
        )
    todo = [n for n in numbers if n not in already]
    return DocumentPlan(document_id, key, budget, todo, extracted, len(already))


async def _answer_pages(
    plan: DocumentPlan,
    path: str,
    password: SecretStr | None,
    force: bool,
    settings: Settings,
    starting_report: asyncio.Future[ProgressReport],
) -> None:
    """Extract and answer the pages, BATCHES_IN_FLIGHT batches at a time.

    While the engine answers one batch, the next waits in its queue, extracted, and the one
    after is being extracted, so the engine always has pages waiting (it keeps the slot and the
    weights on the device while it does) and a long document never holds more than a few
    batches of task runs. Whichever batch finishes is replaced at once, not the oldest.
    """
    logger, size = get_run_logger(), settings.batch_size
    infer = infer_batch.with_options(
        retries=settings.oom_retries, retry_delay_seconds=settings.oom_retry_delay_seconds
    )
    batches = (plan.todo[i : i + size] for i in range(0, len(plan.todo), size))
    in_flight: dict[asyncio.Future, tuple[list[int], BatchRun]] = {}

    def submit(batch: list[int]) -> None:
        """The batch's page extractions, and its inference once they are done."""
        extracts = [
            extract_page.submit(plan.document_id, path, n, password, settings, plan.budget)
            for n in batch
            if n not in plan.extracted
        ]
        run = start_batch(infer, plan.document_id, batch, settings, force, extracts)
        in_flight[asyncio.ensure_future(asyncio.to_thread(run.wait))] = (batch, run)

    for batch in islice(batches, BATCHES_IN_FLIGHT):
        submit(batch)
    report = await starting_report
    while in_flight:
        done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for waited in done:
            batch, run = in_flight.pop(waited)
            waited.result()  # raises what waiting raised (a suspended flow run)
            if (following := next(batches, None)) is not None:
                submit(following)
            if run.failure:
                logger.error("pages %s failed: %s", batch, run.failure)
            await report.advance(len(batch))


async def _finish(plan: DocumentPlan, path: str, settings: Settings) -> dict[str, Any]:
    """Set the document's status and publish its summary, pages and picture."""
    summary, sha = await asyncio.to_thread(
        finish_document, settings, plan.key, path, plan.already_done, flow_run.id
    )
    await asyncio.gather(
        publish_summary(summary, sha),
        publish_run_report(settings.resolved_database_url, plan.key, summary, sha),
    )
    return summary


def _pages_on_record(
    settings: Settings, key: queries.ResultKey, numbers: set[int], force: bool
) -> tuple[set[int], set[int]]:
    """The document's pages already extracted, and those of `numbers` already answered for this
    model and prompt (none when `force`)."""
    with session_scope(settings.resolved_database_url) as session:
        extracted = queries.extracted_pages(session, key.document_id)
        already = set() if force else queries.done_pages(session, key) & numbers
    return extracted, already


def finish_document(
    settings: Settings, key: queries.ResultKey, path: str, already_done: int, run_id: str | None
) -> tuple[dict[str, Any], str]:
    """Set the document's status from its rows; its summary and the file's sha256."""
    with session_scope(settings.resolved_database_url) as session:
        counts = queries.document_counts(session, key)
        failed = counts["failed"] + counts["extract_failed"]
        status = (
            "done" if not failed else ("partial" if counts["ok"] or counts["no_text"] else "failed")
        )
        queries.set_document_status(session, key.document_id, status)
        summary = queries.run_summary(session, key, run_id)
        errors = queries.page_errors(session, key)
        sha = session.get(queries.Document, key.document_id).sha256
    summary.update(
        file=Path(path).name,
        document_id=key.document_id,
        status=status,
        flow_run_id=run_id,
        pages_ok=counts["ok"],
        pages_failed=failed,
        pages_no_text=counts["no_text"],
        pages_already_done=already_done,
        errors=errors,
    )
    return summary, sha
