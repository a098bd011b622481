"""Prefect task: extract one page's text (pypdf, in a worker process) and store it."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from vramflow import pdf
from vramflow.config import Settings
from vramflow.db import queries
from vramflow.db.session import session_scope
from vramflow.extraction_budget import ExtractionBudget


@task(name="extract-page", cache_policy=NO_CACHE, task_run_name="extract page {page_number}")
def extract_page(
    document_id: int,
    path: str,
    page_number: int,
    password: SecretStr | None,
    settings: Settings,
    budget: ExtractionBudget,
) -> str:
    """Returns the page status (ok, no_text, failed); a bad page never fails the task.

    `budget` is the document's extraction time limit: once it is spent, pages fail fast.
    `password` is a `SecretStr` so that Prefect stores it as "**********" with the task run.
    """
    allowed = min(settings.page_timeout_seconds, budget.remaining())
    if allowed <= 0:
        page = pdf.PageText(
            page_number,
            "",
            0,
            0.0,
            "failed",
            "LimitExceededError",
            f"the document's extraction time limit "
            f"({settings.document_timeout_seconds:g} s) was reached",
        )
    else:
        secret = password.get_secret_value() if password else None
        page = pdf.extract_page(path, page_number, secret, timeout_s=allowed)
        budget.spend(page.extract_seconds)
    with session_scope(settings.resolved_database_url) as session:
        queries.record_page(
            session,
            document_id,
            page_number=page_number,
            text=page.text,
            chars=page.chars,
            extract_seconds=page.extract_seconds,
            status=page.status,
            error_type=page.error_type,
            error_message=page.error_message,
        )
    if page.status == "failed":
        get_run_logger().warning(
            "page %d: %s: %s", page_number, page.error_type, page.error_message
        )
    return page.status
