"""Queries as plain functions over a Session. Writes are upserts on unique keys, so concurrent
flow runs never duplicate a row and a re-run updates in place."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from vramflow.db.models import Attempt, Base, Document, Page, Result, SlotHold, utcnow


@dataclass(frozen=True)
class ResultKey:
    """The idempotence key of a result, less the page number."""

    document_id: int
    model_id: str
    prompt_hash: str
    settings_hash: str

    def where(self):
        return (
            Result.document_id == self.document_id,
            Result.model_id == self.model_id,
            Result.prompt_hash == self.prompt_hash,
            Result.settings_hash == self.settings_hash,
        )


def upsert(session: Session, model: type[Base], values: dict[str, Any], keys: Sequence[str]):
    """INSERT ... ON CONFLICT (keys) DO UPDATE on SQLite and PostgreSQL alike."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(model).values(**values)
    changed = {k: stmt.excluded[k] for k in values if k not in keys}
    if "updated_at" in model.__table__.c:
        changed["updated_at"] = utcnow()
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=changed)
    session.execute(stmt)


def record_document(session: Session, **values: Any) -> int:
    """Create or refresh the document row for a sha256; returns its id."""
    upsert(session, Document, values, ["sha256"])
    return session.scalar(select(Document.id).where(Document.sha256 == values["sha256"]))


def set_document_status(session: Session, document_id: int, status: str, **error: Any) -> None:
    values = {"status": status, "error_type": None, "error_message": None, **error}
    session.execute(update(Document).where(Document.id == document_id).values(**values))


def find_document(session: Session, sha256: str) -> Document | None:
    return session.scalar(select(Document).where(Document.sha256 == sha256))


def record_page(session: Session, document_id: int, **values: Any) -> None:
    upsert(session, Page, {"document_id": document_id, **values}, ["document_id", "page_number"])


def extracted_pages(session: Session, document_id: int) -> set[int]:
    """Pages already extracted (ok or no_text); failed ones are tried again."""
    rows = session.scalars(
        select(Page.page_number).where(
            Page.document_id == document_id, Page.status.in_(("ok", "no_text"))
        )
    )
    return set(rows)


def page_texts(session: Session, document_id: int, numbers: Iterable[int]) -> dict[int, Page]:
    rows = session.scalars(
        select(Page).where(Page.document_id == document_id, Page.page_number.in_(list(numbers)))
    )
    return {row.page_number: row for row in rows}


def done_pages(session: Session, key: ResultKey, only_run: str | None = None) -> set[int]:
    """Pages whose result under `key` is already ok (by flow run `only_run`, if given)."""
    query = select(Result.page_number).where(*key.where(), Result.status == "ok")
    if only_run is not None:
        query = query.where(Result.flow_run_id == only_run)
    return set(session.scalars(query))


def start_results(
    session: Session,
    key: ResultKey,
    pages: Sequence[int],
    prompt: str,
    settings_json: str,
    flow_run_id: str | None,
    worker_id: str | None = None,
) -> dict[int, int]:
    """Mark the pages' results as running (creating them), claimed by `worker_id` (a GPU
    worker; None in a process running its own engine); returns page → result id."""
    for page in pages:
        values = {
            "document_id": key.document_id,
            "page_number": page,
            "model_id": key.model_id,
            "prompt_hash": key.prompt_hash,
            "settings_hash": key.settings_hash,
            "prompt": prompt,
            "settings_json": settings_json,
            "status": "running",
            "flow_run_id": flow_run_id,
            "worker_id": worker_id,
        }
        upsert(
            session,
            Result,
            values,
            ["document_id", "page_number", "model_id", "prompt_hash", "settings_hash"],
        )
    rows = session.execute(
        select(Result.page_number, Result.id).where(*key.where(), Result.page_number.in_(pages))
    )
    return dict(rows.all())


def record_attempts(session: Session, attempts: Sequence[dict[str, Any]]) -> None:
    """Store attempts and count them on their results."""
    for attempt in attempts:
        session.add(Attempt(**attempt))
        session.execute(
            update(Result)
            .where(Result.id == attempt["result_id"])
            .values(attempts=Result.attempts + 1)
        )


def finish_result(session: Session, result_id: int, **values: Any) -> None:
    session.execute(update(Result).where(Result.id == result_id).values(**values))


def record_hold(session: Session, **values: Any) -> None:
    session.add(SlotHold(**values))


def count_hold_pages(
    session: Session, hold_id: str, pages: int, flow_run_ids: Iterable[str | None]
) -> None:
    """Add a call's answered pages to its hold; a hold belongs to the run of its first call."""
    first = next((run for run in flow_run_ids if run), None)
    session.execute(
        update(SlotHold)
        .where(SlotHold.hold_id == hold_id)
        .values(
            pages=SlotHold.pages + pages,
            flow_run_id=func.coalesce(SlotHold.flow_run_id, first),
        )
    )


def fail_results(
    session: Session,
    key: ResultKey,
    pages: Sequence[int],
    prompt: str,
    settings_json: str,
    flow_run_id: str | None,
    error_type: str,
    message: str,
) -> None:
    """Store `pages` as failed with the reason, unless already answered."""
    pages = [page for page in pages if page not in done_pages(session, key)]
    ids = start_results(session, key, pages, prompt, settings_json, flow_run_id)
    for result_id in ids.values():
        finish_result(
            session,
            result_id,
            status="failed",
            error_type=error_type,
            error_message=message,
            worker_id=None,
        )


def finish_hold(session: Session, hold_id: str, **values: Any) -> None:
    session.execute(update(SlotHold).where(SlotHold.hold_id == hold_id).values(**values))


def document_counts(session: Session, key: ResultKey) -> dict[str, int]:
    """Pages by outcome for one document and key: ok, failed, no_text, extract_failed."""
    counts = dict(
        session.execute(
            select(Result.status, func.count()).where(*key.where()).group_by(Result.status)
        ).all()
    )
    page_counts = dict(
        session.execute(
            select(Page.status, func.count())
            .where(Page.document_id == key.document_id)
            .group_by(Page.status)
        ).all()
    )
    return {
        "ok": counts.get("ok", 0),
        "failed": counts.get("failed", 0) + counts.get("running", 0),
        "no_text": page_counts.get("no_text", 0),
        "extract_failed": page_counts.get("failed", 0),
    }


def run_summary(session: Session, key: ResultKey, flow_run_id: str | None) -> dict[str, Any]:
    """Latency percentiles, peak memory, slot waiting and OOM retries of one flow run."""
    latencies = sorted(
        session.scalars(
            select(Result.infer_seconds).where(
                *key.where(), Result.status == "ok", Result.flow_run_id == flow_run_id
            )
        )
    )
    attempts = (
        select(Attempt)
        .join(Result, Attempt.result_id == Result.id)
        .where(*key.where(), Attempt.flow_run_id == flow_run_id)
    )
    rows = session.scalars(attempts).all()
    holds = session.scalars(select(SlotHold).where(SlotHold.flow_run_id == flow_run_id)).all()

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    vram = [r.torch_max_allocated_bytes for r in rows if r.torch_max_allocated_bytes is not None]
    return {
        "pages_inferred": len(latencies),
        "p50_page_seconds": pct(0.50),
        "p95_page_seconds": pct(0.95),
        "peak_vram_bytes": max(vram) if vram else None,
        "peak_rss_bytes": max((r.rss_bytes or 0 for r in rows), default=None) or None,
        "slot_wait_seconds": sum(h.wait_seconds for h in holds),
        "slot_holds": len(holds),
        "oom_attempts": len({r.call_id for r in rows if r.outcome == "oom"}),
    }


def page_errors(session: Session, key: ResultKey) -> list[tuple[int, str]]:
    """(page, "Type: message") for failed extractions and failed results, by page."""
    extraction = session.execute(
        select(Page.page_number, Page.error_type, Page.error_message).where(
            Page.document_id == key.document_id, Page.status == "failed"
        )
    ).all()
    inference = session.execute(
        select(Result.page_number, Result.error_type, Result.error_message).where(
            *key.where(), Result.status == "failed"
        )
    ).all()
    return sorted((page, f"{kind}: {message}") for page, kind, message in [*extraction, *inference])


def mark_stopped(session: Session, path: str, since: datetime) -> tuple[str, int] | None:
    """After a run on the file at `path` was stopped (Ctrl-C): its results still `running`
    fail as interrupted, and the document, if still `running`, becomes `stopped`, so that no
    status claims work that no longer goes on. Returns (file name, pages answered since
    `since`), or None when the run never recorded the document."""
    document = session.scalar(
        select(Document).where(Document.path == path).order_by(Document.updated_at.desc())
    )
    if document is None:
        return None
    session.execute(
        update(Result)
        .where(
            Result.document_id == document.id,
            Result.status == "running",
            Result.updated_at >= since,
        )
        .values(
            status="failed",
            error_type="Interrupted",
            error_message="the run was stopped before this page was answered",
        )
    )
    if document.status == "running":
        document.status = "stopped"
    answered = session.scalar(
        select(func.count()).where(
            Result.document_id == document.id, Result.status == "ok", Result.updated_at >= since
        )
    )
    return document.file_name, answered or 0
