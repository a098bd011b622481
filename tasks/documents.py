"""Prefect task: open a PDF, record its Document row, fail just this document on bad input."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from vramflow import pdf
from vramflow.config import Settings
from vramflow.db import queries
from vramflow.db.schema import ensure_schema
from vramflow.db.session import session_scope
from vramflow.errors import DocumentError


@task(name="open-document", cache_policy=NO_CACHE)
def open_document(path: str, password: str | None, settings: Settings) -> tuple[int, int]:
    """Returns (document id, page count); a broken file is recorded as failed, then raised."""
    ensure_schema(settings.resolved_database_url)
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise DocumentError(f"{file}: no such file")
    sha256 = pdf.file_sha256(file)
    base = {
        "sha256": sha256,
        "path": str(file),
        "file_name": file.name,
        "size_bytes": file.stat().st_size,
    }
    try:
        info = pdf.open_document(
            file,
            password,
            max_file_bytes=settings.max_file_bytes,
            max_pages=settings.max_pages,
            timeout_s=settings.document_timeout_seconds,
            sha256=sha256,
        )
    except DocumentError as exc:
        with session_scope(settings.resolved_database_url) as session:
            queries.record_document(
                session,
                **base,
                status="failed",
                error_type=type(exc).__name__,
                error_message=str(exc),
            )
        get_run_logger().error("%s", exc)
        raise
    with session_scope(settings.resolved_database_url) as session:
        document_id = queries.record_document(
            session,
            **base,
            page_count=info.page_count,
            encrypted=info.encrypted,
            status="running",
            error_type=None,
            error_message=None,
        )
    get_run_logger().info("%s: %d pages, sha256 %s", file.name, info.page_count, sha256[:12])
    return document_id, info.page_count
