"""Read-side queries for `vramflow show` and `vramflow stats`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Integer, func, select
from sqlalchemy.orm import Session

from vramflow.db.models import Attempt, Document, Page, Result


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite drops the zone; we always store UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def find_documents(session: Session, ref: str, sha256: str | None) -> list[Document]:
    """Documents matching a file's hash, else a sha256 prefix, else a file name."""
    if sha256:
        return list(session.scalars(select(Document).where(Document.sha256 == sha256)))
    by_sha = select(Document).where(Document.sha256.startswith(ref.lower()))
    found = list(session.scalars(by_sha)) if len(ref) >= 6 else []
    return found or list(session.scalars(select(Document).where(Document.file_name == ref)))


@dataclass(frozen=True)
class ResultSet:
    """The results of one document under one model, prompt and generation settings."""

    model_id: str
    prompt: str
    prompt_hash: str
    settings_hash: str
    results: int


def result_sets(
    session: Session,
    document: Document,
    model_id: str | None = None,
    prompt_hash: str | None = None,
) -> list[ResultSet]:
    """The document's result sets (optionally of one model and prompt), newest first."""
    newest = func.max(Result.updated_at)
    query = (
        select(
            Result.model_id,
            func.max(Result.prompt),
            Result.prompt_hash,
            Result.settings_hash,
            func.count(Result.id),
        )
        .where(Result.document_id == document.id)
        .group_by(Result.model_id, Result.prompt_hash, Result.settings_hash)
        .order_by(newest.desc())
    )
    if model_id:
        query = query.where(Result.model_id == model_id)
    if prompt_hash:
        query = query.where(Result.prompt_hash == prompt_hash)
    return [ResultSet(*row) for row in session.execute(query)]


def page_rows(
    session: Session, document: Document, result_set: ResultSet | None
) -> list[dict[str, Any]]:
    """One dict per page of the document: its result in `result_set`, or the page's own status
    (`pending` for a page with text and no result, or not extracted yet)."""
    results: dict[int, Result] = {}
    if result_set is not None:
        query = select(Result).where(
            Result.document_id == document.id,
            Result.model_id == result_set.model_id,
            Result.prompt_hash == result_set.prompt_hash,
            Result.settings_hash == result_set.settings_hash,
        )
        results = {r.page_number: r for r in session.scalars(query)}
    pages = {
        p.page_number: p
        for p in session.scalars(select(Page).where(Page.document_id == document.id))
    }
    numbers = set(range(1, (document.page_count or 0) + 1)) | set(pages) | set(results)
    return [_page_row(n, pages.get(n), results.get(n)) for n in sorted(numbers)]


def unopened_row(document: Document) -> dict[str, Any]:
    """The one row of a document that could not be opened: status `failed` and the error."""
    return {
        "status": "failed",
        "error": f"{document.error_type}: {document.error_message}",
        "pages": document.page_count,
    }


def _page_row(number: int, page: Page | None, result: Result | None) -> dict[str, Any]:
    status = result.status if result else (page.status if page else "pending")
    if result is None and page is not None and page.status == "ok":
        status = "pending"  # extracted, not yet through the model
    error = None
    if result is not None and result.error_message:
        error = f"{result.error_type}: {result.error_message}"
    elif page is not None and page.error_message:
        error = f"{page.error_type}: {page.error_message}"
    return {
        "page": number,
        "status": status,
        "output": result.output if result else None,
        "error": error,
        "chars": page.chars if page else None,
        "model": result.model_id if result else None,
        "prompt": result.prompt if result else None,
        "device": result.device if result else None,
        "attempts": result.attempts if result else 0,
        "tokens_in": result.tokens_in if result else None,
        "tokens_out": result.tokens_out if result else None,
        "input_truncated": bool(result.input_truncated) if result else False,
        "infer_started_at": _iso(result.infer_started_at) if result else None,
        "infer_finished_at": _iso(result.infer_finished_at) if result else None,
        "infer_seconds": result.infer_seconds if result else None,
        "slot_wait_seconds": result.slot_wait_seconds if result else None,
        "peak_vram_bytes": result.peak_vram_bytes if result else None,
        "flow_run_id": result.flow_run_id if result else None,
    }


def stats_rows(session: Session) -> list[dict[str, Any]]:
    """Per document and model: pages by outcome, model time, peak VRAM."""
    query = (
        select(
            Document.id,
            Document.file_name,
            Document.status,
            Result.model_id,
            func.count(Result.id),
            func.sum((Result.status == "ok").cast(Integer)),
            func.sum((Result.status == "failed").cast(Integer)),
            func.max(Result.peak_vram_bytes),
        )
        .join(Result, Result.document_id == Document.id)
        .group_by(Document.id, Document.file_name, Document.status, Result.model_id)
        .order_by(Document.file_name)
    )
    rows = []
    for doc_id, name, status, model, total, ok, failed, vram in session.execute(query):
        rows.append(
            {
                "document": name,
                "status": status,
                "model": model,
                "pages": total,
                "ok": ok or 0,
                "failed": failed or 0,
                "model_seconds": _model_seconds(session, doc_id, model),
                "peak_vram_bytes": vram,
            }
        )
    return rows


def _model_seconds(session: Session, document_id: int, model_id: str) -> float:
    """Time in successful model calls; a batch's call counts once, not once per page."""
    calls = (
        select(func.max(Attempt.infer_seconds).label("seconds"))
        .join(Result, Attempt.result_id == Result.id)
        .where(
            Result.document_id == document_id,
            Result.model_id == model_id,
            Attempt.outcome == "ok",
        )
        .group_by(Attempt.call_id)
        .subquery()
    )
    return float(session.scalar(select(func.coalesce(func.sum(calls.c.seconds), 0.0))))


def peak_rss(session: Session) -> int | None:
    return session.scalar(select(func.max(Attempt.rss_bytes)))
