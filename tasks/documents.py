"""Prefect task: open a PDF, record its Document row, fail just this document on bad input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from vramflow import pdf
from vramflow.config import Settings
from vramflow.db import queries
from vramflow.db.schema import ensure_schema
from vramflow.db.session import session_scope
from vramflow.errors import DocumentError, NotAPdfError
from vramflow.pdf_file import check_file


@dataclass(frozen=True)
class OpenedDocument:
    """The document's row and page count, or why it cannot be processed.

    A bad document is an expected outcome, not a crash: returning it (rather than raising)
    keeps Prefect from logging a traceback for every encrypted or broken file.
    """

    document_id: int | None
    page_count: int
    error: DocumentError | None = None

    def unwrap(self) -> tuple[int, int]:
        """(document id, page count); raises the document's error if it could not be opened."""
        if self.error is not None or self.document_id is None:
            raise self.error or DocumentError("the document was not recorded")
        return self.document_id, self.page_count


@task(name="open-document", cache_policy=NO_CACHE)
def open_document(path: str, password: SecretStr | None, settings: Settings) -> OpenedDocument:
    """Check, open and record the document; a broken file is recorded as failed."""
    logger = get_run_logger()
    try:
        # Size, type and header come first: a file over the limit is never read, let alone
        # hashed, and gets no row (rows are keyed by the hash); nor does a path that is not a
        # file. Empty files and files without a PDF header are small enough to hash, and
        # their failed row tells the inbox sweep to leave those bytes alone.
        checked = check_file(path, settings.max_file_bytes)
    except NotAPdfError as exc:
        return _failed(settings, Path(path).expanduser().resolve(), exc)
    except DocumentError as exc:
        logger.error("%s", exc)
        return OpenedDocument(None, 0, exc)
    ensure_schema(settings.resolved_database_url)
    file = checked.path
    sha256 = pdf.file_sha256(file)
    try:
        info = pdf.open_document(
            file,
            password.get_secret_value() if password else None,
            max_file_bytes=settings.max_file_bytes,
            max_pages=settings.max_pages,
            timeout_s=settings.document_timeout_seconds,
            sha256=sha256,
        )
    except DocumentError as exc:
        return _failed(settings, file, exc, sha256)
    base = _identity(file, sha256)
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
    logger.info("%s: %d pages, sha256 %s", file.name, info.page_count, sha256[:12])
    return OpenedDocument(document_id, info.page_count)


def _identity(file: Path, sha256: str) -> dict[str, object]:
    return {
        "sha256": sha256,
        "path": str(file),
        "file_name": file.name,
        "size_bytes": file.stat().st_size,
    }


def _failed(
    settings: Settings, file: Path, exc: DocumentError, sha256: str | None = None
) -> OpenedDocument:
    """Record the document as failed with the reason; one log line, the traceback at debug."""
    ensure_schema(settings.resolved_database_url)
    base = _identity(file, sha256 or pdf.file_sha256(file))
    with session_scope(settings.resolved_database_url) as session:
        known = queries.find_document(session, base["sha256"])
        # A document these bytes already made (done, partial) stays as it was: the failure
        # belongs to this run (a wrong password, a time limit), not to the document.
        if known is None or known.status == "failed":
            queries.record_document(
                session,
                **base,
                status="failed",
                error_type=type(exc).__name__,
                error_message=str(exc),
            )
    logger = get_run_logger()
    logger.error("%s", exc)
    logger.debug("why %s could not be opened", file.name, exc_info=exc)
    return OpenedDocument(None, 0, exc)
