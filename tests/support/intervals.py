"""Measure concurrency from stored or recorded (start, end) intervals."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime


def max_concurrency(intervals: Iterable[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (an end at t closes before a start at t opens)."""
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda event: (event[0], event[1]))
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def stored_call_intervals(url: str) -> dict[str, list[tuple[datetime, datetime]]]:
    """Model-call intervals per device from the attempts table (one per call, not per page)."""
    from sqlalchemy import select

    from vramflow.db.models import Attempt
    from vramflow.db.session import session_scope

    with session_scope(url) as session:
        rows = session.execute(
            select(
                Attempt.call_id, Attempt.device, Attempt.started_at, Attempt.finished_at
            ).distinct()
        ).all()
    by_device: dict[str, list[tuple[datetime, datetime]]] = {}
    for _, device, start, end in rows:
        by_device.setdefault(device, []).append((start, end))
    return by_device


def stored_hold_intervals(url: str) -> list[tuple[datetime, datetime]]:
    """Slot-hold intervals (weights resident on the device) from the slot_holds table."""
    from sqlalchemy import select

    from vramflow.db.models import SlotHold
    from vramflow.db.session import session_scope

    with session_scope(url) as session:
        rows = session.execute(select(SlotHold.acquired_at, SlotHold.released_at)).all()
    return [(start, end) for start, end in rows]
