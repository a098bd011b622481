"""Queries for the operations flows: is an inbox file already processed, what needs a retry.

Plain functions over a Session, like `queries`; they only read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vramflow.db.models import Document, Page, Result
from vramflow.db.queries import ResultKey

FINISHED_DOCUMENT = ("done", "partial")


def processed_document(
    session: Session, sha256: str, model_id: str, prompt_hash: str, settings_hash: str
) -> Document | None:
    """The document with these bytes if a run under this key finished it (done or partial):
    every page with text has a final result (ok or failed) under the key."""
    document = session.scalar(select(Document).where(Document.sha256 == sha256))
    if document is None or document.status not in FINISHED_DOCUMENT:
        return None
    key = ResultKey(document.id, model_id, prompt_hash, settings_hash)
    finished = session.scalar(
        select(func.count())
        .select_from(Result)
        .where(*key.where(), Result.status.in_(("ok", "failed")))
    )
    with_text = session.scalar(
        select(func.count())
        .select_from(Page)
        .where(Page.document_id == document.id, Page.status == "ok")
    )
    if with_text and (finished or 0) < with_text:
        return None
    return document


def unreadable_document(session: Session, sha256: str) -> Document | None:
    """The document with these bytes if opening it failed (not a PDF, encrypted, too large):
    the same bytes fail the same way, whatever the model or prompt."""
    return session.scalar(
        select(Document).where(
            Document.sha256 == sha256, Document.status == "failed", Document.error_type.is_not(None)
        )
    )


@dataclass(frozen=True)
class RetryRow:
    """A result to redo (failed, or running for too long), or the newest result of a
    partial document, which names the key its last run used."""

    document_id: int
    page_number: int
    model_id: str
    prompt: str
    prompt_hash: str
    settings_hash: str
    settings_json: str
    status: str
    flow_run_id: str | None
    attempts: int

    @property
    def key(self) -> ResultKey:
        return ResultKey(self.document_id, self.model_id, self.prompt_hash, self.settings_hash)


@dataclass(frozen=True)
class RetryJob:
    """One document to run again under one key, with the stored settings of its results."""

    document_id: int
    path: str
    file_name: str
    encrypted: bool
    model_id: str
    prompt: str
    prompt_hash: str
    settings_hash: str
    settings: dict
    pages: tuple[int, ...]
    reasons: tuple[str, ...]


_ROW_COLUMNS = (
    Result.document_id,
    Result.page_number,
    Result.model_id,
    Result.prompt,
    Result.prompt_hash,
    Result.settings_hash,
    Result.settings_json,
    Result.status,
    Result.flow_run_id,
    Result.attempts,
)


def failed_results(session: Session, max_attempts: int) -> list[RetryRow]:
    """Failed results (out of memory, time limit, ...) with fewer than `max_attempts` calls."""
    query = select(*_ROW_COLUMNS).where(Result.status == "failed", Result.attempts < max_attempts)
    return [RetryRow(*row) for row in session.execute(query.order_by(Result.id))]


def stuck_results(session: Session, claimed_before: datetime) -> list[RetryRow]:
    """Results still `running` that were claimed before `claimed_before`."""
    query = select(*_ROW_COLUMNS).where(
        Result.status == "running", Result.updated_at < claimed_before
    )
    return [RetryRow(*row) for row in session.execute(query.order_by(Result.id))]


def partial_documents(session: Session) -> list[RetryRow]:
    """For each partial document, its newest result: the key of the run that left it so."""
    newest = (
        select(Result.document_id, func.max(Result.updated_at).label("at"))
        .join(Document, Document.id == Result.document_id)
        .where(Document.status == "partial")
        .group_by(Result.document_id)
        .subquery()
    )
    query = (
        select(*_ROW_COLUMNS)
        .join(
            newest,
            (Result.document_id == newest.c.document_id) & (Result.updated_at == newest.c.at),
        )
        .order_by(Result.document_id, Result.id)
    )
    rows: dict[int, RetryRow] = {}
    for row in session.execute(query):
        rows.setdefault(row.document_id, replace(RetryRow(*row), status="partial"))
    return list(rows.values())


def retry_jobs(session: Session, rows: list[RetryRow]) -> list[RetryJob]:
    """Group rows by document and key into jobs, with each document's path."""
    grouped: dict[ResultKey, list[RetryRow]] = {}
    for row in rows:
        grouped.setdefault(row.key, []).append(row)
    jobs = []
    for key, members in grouped.items():
        document = session.get(Document, key.document_id)
        first = members[0]
        jobs.append(
            RetryJob(
                document_id=document.id,
                path=document.path,
                file_name=document.file_name,
                encrypted=bool(document.encrypted),
                model_id=key.model_id,
                prompt=first.prompt,
                prompt_hash=key.prompt_hash,
                settings_hash=key.settings_hash,
                settings=json.loads(first.settings_json),
                pages=tuple(sorted({m.page_number for m in members if m.status != "partial"})),
                reasons=tuple(sorted({m.status for m in members})),
            )
        )
    return jobs
