"""Queries behind `vramflow status` and the metrics endpoint: queue, throughput, slot holders."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from vramflow.db import workers
from vramflow.db.models import Attempt, Result, SlotHold, utcnow


def result_counts(session: Session) -> dict[str, int]:
    """Results by status: pending, running (claimed by a batch, not yet answered), ok, failed."""
    rows = session.execute(select(Result.status, func.count()).group_by(Result.status))
    return {status: count for status, count in rows}


@dataclass(frozen=True)
class Queue:
    """Pages claimed by a batch and not answered yet, and how long the oldest has waited."""

    running: int
    pending: int
    oldest_since: datetime | None


def queue(session: Session) -> Queue:
    counts = result_counts(session)
    oldest = session.scalar(
        select(func.min(Result.updated_at)).where(Result.status.in_(("running", "pending")))
    )
    return Queue(counts.get("running", 0), counts.get("pending", 0), oldest)


@dataclass(frozen=True)
class Throughput:
    """Pages answered in the last `minutes`, and model calls by outcome in that time."""

    minutes: float
    pages: int
    calls_ok: int
    calls_oom: int
    tokens_out: int

    @property
    def pages_per_second(self) -> float:
        return self.pages / (self.minutes * 60) if self.minutes else 0.0


def throughput(session: Session, minutes: float, now: datetime | None = None) -> Throughput:
    """What the model got through in the `minutes` before `now` (from the attempts table)."""
    until = now or utcnow()
    recent = Attempt.finished_at.between(until - timedelta(minutes=minutes), until)
    pages = session.scalar(
        select(func.count(distinct(Attempt.result_id))).where(recent, Attempt.outcome == "ok")
    )
    calls = dict(
        session.execute(
            select(Attempt.outcome, func.count(distinct(Attempt.call_id)))
            .where(recent)
            .group_by(Attempt.outcome)
        ).all()
    )
    tokens = session.scalar(
        select(func.coalesce(func.sum(Attempt.tokens_out), 0)).where(
            recent, Attempt.outcome == "ok"
        )
    )
    return Throughput(minutes, pages or 0, calls.get("ok", 0), calls.get("oom", 0), tokens)


def open_holds(session: Session) -> list[SlotHold]:
    """Slot holds without a release: the current holders (or holders that died holding)."""
    query = select(SlotHold).where(SlotHold.released_at.is_(None)).order_by(SlotHold.acquired_at)
    return list(session.scalars(query))


@dataclass(frozen=True)
class GpuWorker:
    """A resident GPU worker process, its queue and its last heartbeat."""

    worker_id: str
    host: str
    pid: int
    device: str
    pages_waiting: int | None
    heartbeat_at: datetime | None


def gpu_workers(session: Session, timeout_s: float = 30) -> list[GpuWorker]:
    """The GPU workers alive (not stopped, a heartbeat under `timeout_s` old), for
    `vramflow status`."""
    return [
        GpuWorker(w.id, w.host, w.pid, w.device, w.pages_waiting, w.heartbeat_at)
        for w in workers.alive(session, timeout_s)
    ]
