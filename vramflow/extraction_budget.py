"""A document's extraction time limit, counted in seconds spent extracting, not in wall time.

Pages of a long document are extracted as the flow's task threads come free, and inference
frees them: page 200 of a document is extracted minutes after page 1. A wall-clock deadline
from the start of the run would therefore fail the last pages of every document whose inference
(or wait for a busy GPU) takes longer than the limit. The limit exists to stop a document whose
pages are all slow to extract, so it counts only the time opening and extracting took.
"""

from __future__ import annotations

import threading


class ExtractionBudget:
    """Seconds a document may spend being opened and extracted, shared by its page tasks.

    A plain class on purpose: Prefect rebuilds dataclasses and pydantic models found in task
    parameters, and every page task must spend from this one object. Pages extracted side by
    side may together overshoot the limit by up to one page time limit each.
    """

    def __init__(self, limit_seconds: float, spent_seconds: float = 0.0) -> None:
        self.limit_seconds = limit_seconds
        self._spent = max(0.0, spent_seconds)
        self._lock = threading.Lock()

    @property
    def spent_seconds(self) -> float:
        with self._lock:
            return self._spent

    def remaining(self) -> float:
        """Seconds left; zero or less once the limit is reached."""
        with self._lock:
            return self.limit_seconds - self._spent

    def spend(self, seconds: float) -> None:
        """Count `seconds` of extraction against the limit."""
        with self._lock:
            self._spent += max(0.0, seconds)

    def __repr__(self) -> str:
        return f"ExtractionBudget({self.spent_seconds:.3g} of {self.limit_seconds:g} s spent)"
