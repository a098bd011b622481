"""What an operator sees of a run: its pages in a table and its model calls on a time axis."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vramflow.db.models import Attempt, Page, Result, SlotHold
from vramflow.db.queries import ResultKey
from vramflow.timeline import Call, Hold, Timeline


@dataclass(frozen=True)
class PageLine:
    """One page of a document under one result key, with the model calls of the run that made
    its result summed up (attempts: calls it took part in, OOM splits and retries included)."""

    page: int
    status: str  # ok | failed | no_text | running | pending
    output: str | None
    error: str | None
    tokens_in: int | None
    tokens_out: int | None
    model_seconds: float | None
    peak_vram_bytes: int | None
    peak_rss_bytes: int | None
    attempts: int


def page_lines(session: Session, key: ResultKey) -> list[PageLine]:
    """Every page of the document: extracted pages and results under `key`, by page number."""
    pages = {
        p.page_number: p
        for p in session.scalars(select(Page).where(Page.document_id == key.document_id))
    }
    results = {r.page_number: r for r in session.scalars(select(Result).where(*key.where()))}
    # Figures of the run that made each result (a forced re-run's, not an older run's).
    calls = dict(
        (result_id, (count, vram, rss))
        for result_id, count, vram, rss in session.execute(
            select(
                Attempt.result_id,
                func.count(Attempt.id),
                func.max(Attempt.torch_max_allocated_bytes),
                func.max(Attempt.rss_bytes),
            )
            .join(Result, Attempt.result_id == Result.id)
            .where(*key.where(), Attempt.flow_run_id == Result.flow_run_id)
            .group_by(Attempt.result_id)
        )
    )
    return [
        _line(n, pages.get(n), results.get(n), calls) for n in sorted(set(pages) | set(results))
    ]


def _line(number: int, page: Page | None, result: Result | None, calls: dict) -> PageLine:
    if result is not None:
        error = f"{result.error_type}: {result.error_message}" if result.error_message else None
        count, vram, rss = calls.get(result.id, (0, None, None))
        return PageLine(
            number,
            result.status,
            result.output,
            error,
            result.tokens_in,
            result.tokens_out,
            result.infer_seconds,
            vram,
            rss,
            count,
        )
    status = "pending" if page is None or page.status == "ok" else page.status
    error = f"{page.error_type}: {page.error_message}" if page and page.error_message else None
    return PageLine(number, status, None, error, None, None, None, None, None, 0)


def latest_flow_run(session: Session, document_id: int | None = None) -> str | None:
    """The flow run of the most recent model call (of one document, if given)."""
    query = select(Attempt.flow_run_id).where(Attempt.flow_run_id.is_not(None))
    if document_id is not None:
        query = query.join(Result, Attempt.result_id == Result.id).where(
            Result.document_id == document_id
        )
    return session.scalar(query.order_by(Attempt.started_at.desc()).limit(1))


def timeline(
    session: Session,
    flow_run_id: str | Collection[str] | None = None,
    since: datetime | None = None,
    title: str = "",
) -> Timeline:
    """Model calls and slot holds of a flow run (or of several: a sweep's documents), or of
    every run since `since`.

    A run's holds are those it took itself, and holds taken for no one run (a GPU worker's,
    serving several runs) while the run's calls went on.
    """
    calls = select(
        Attempt.call_id,
        func.min(Attempt.started_at),
        func.max(Attempt.finished_at),
        func.count(Attempt.id),
        func.min(Attempt.outcome),
        func.min(Attempt.device),
        func.max(Attempt.torch_max_allocated_bytes),
        func.max(Attempt.nvml_used_after_bytes),
        func.max(Attempt.nvml_total_bytes),
        func.max(Attempt.rss_bytes),
    ).group_by(Attempt.call_id)
    holds = select(SlotHold)
    if flow_run_id is not None:
        runs = [flow_run_id] if isinstance(flow_run_id, str) else list(flow_run_id)
        calls = calls.where(Attempt.flow_run_id.in_(runs))
        holds = holds.where(_holds_of_runs(session, runs))
    if since is not None:
        calls = calls.where(Attempt.finished_at >= since)
        holds = holds.where((SlotHold.released_at >= since) | SlotHold.released_at.is_(None))
    found = Timeline(title=title)
    found.calls = sorted(
        (Call(*row[1:]) for row in session.execute(calls)), key=lambda c: c.started_at
    )
    found.holds = [
        Hold(h.slot_name, h.acquired_at, h.released_at, h.pages, h.wait_seconds)
        for h in session.scalars(holds.order_by(SlotHold.acquired_at))
    ]
    return found


def _holds_of_runs(session: Session, runs: list[str]):
    """Holds by the runs, or by no run while the runs' calls went on."""
    first, last = session.execute(
        select(func.min(Attempt.started_at), func.max(Attempt.finished_at)).where(
            Attempt.flow_run_id.in_(runs)
        )
    ).one()
    own = SlotHold.flow_run_id.in_(runs)
    if first is None:
        return own
    shared = (
        SlotHold.flow_run_id.is_(None)
        & (SlotHold.acquired_at <= last)
        & ((SlotHold.released_at >= first) | SlotHold.released_at.is_(None))
    )
    return own | shared
