"""GPU workers in the database: registration, heartbeats, and who is alive (plain queries)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from vramflow.db.models import GpuWorker, Result, utcnow
from vramflow.db.queries import ResultKey


def register(session: Session, worker_id: str, host: str, pid: int, device: str, kind: str) -> None:
    session.add(GpuWorker(id=worker_id, host=host, pid=pid, device=device, kind=kind))


def beat(session: Session, worker_id: str, pages_waiting: int, models_loaded: int) -> None:
    """Record that the worker is alive, with its queue and the models it holds."""
    session.execute(
        update(GpuWorker)
        .where(GpuWorker.id == worker_id)
        .values(heartbeat_at=utcnow(), pages_waiting=pages_waiting, models_loaded=models_loaded)
    )


def stopped(session: Session, worker_id: str) -> None:
    session.execute(update(GpuWorker).where(GpuWorker.id == worker_id).values(stopped_at=utcnow()))


def alive(session: Session, timeout_s: float, now: datetime | None = None) -> list[GpuWorker]:
    """Workers not stopped whose last heartbeat is under `timeout_s` old."""
    since = (now or utcnow()) - timedelta(seconds=timeout_s)
    query = select(GpuWorker).where(GpuWorker.stopped_at.is_(None), GpuWorker.heartbeat_at >= since)
    return list(session.scalars(query.order_by(GpuWorker.started_at)))


def claims(session: Session, key: ResultKey, pages: Sequence[int]) -> set[str]:
    """The GPU workers that hold `pages` of a document as running."""
    query = select(Result.worker_id).where(
        *key.where(),
        Result.page_number.in_(pages),
        Result.status == "running",
        Result.worker_id.is_not(None),
    )
    return set(session.scalars(query))
