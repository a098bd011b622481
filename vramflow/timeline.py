"""What happened during a run, as plain data: model calls and slot holds on a time axis.

The database builds it (`vramflow.db.run_views.timeline`) and the plot draws it
(`vramflow.plot`); neither needs to know about the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Call:
    """One model call: when, how many pages, how it ended and the memory measured around it."""

    started_at: datetime
    finished_at: datetime
    pages: int
    outcome: str  # ok | oom | timeout | error
    device: str
    torch_peak_bytes: int | None = None  # max_memory_allocated during the call
    nvml_used_bytes: int | None = None  # device-wide, after the call
    nvml_total_bytes: int | None = None
    rss_bytes: int | None = None


@dataclass(frozen=True)
class Hold:
    """One hold of a GPU slot, from acquisition to release (None while still held)."""

    slot_name: str
    acquired_at: datetime
    released_at: datetime | None
    pages: int
    wait_seconds: float


@dataclass
class Timeline:
    """A run's calls and holds in time order; `title` says which run."""

    title: str
    calls: list[Call] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)

    @property
    def start(self) -> datetime | None:
        times = [c.started_at for c in self.calls] + [h.acquired_at for h in self.holds]
        return min(times) if times else None

    @property
    def end(self) -> datetime | None:
        times = [c.finished_at for c in self.calls] + [
            h.released_at for h in self.holds if h.released_at
        ]
        return max(times) if times else None

    @property
    def on_gpu(self) -> bool:
        return any(c.device.startswith("cuda") for c in self.calls)
