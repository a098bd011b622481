"""Run a batch of pages through the model, splitting it on out-of-memory down to one page.

Plain Python: the caller holds the GPU slot and has moved the weights; every model call is
reported through `on_call` as soon as it ends, so the database never lags the work.

A `BatchLimit` remembers, per model and device in this process, how many pages fit after an
out-of-memory error, so later batches start at that size instead of failing again; it grows back
after a run of calls that fit.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psutil

from vramflow import gpu, torch_thread
from vramflow.errors import InferenceTimeoutError
from vramflow.faults import OomInjector
from vramflow.models import Generation, LoadedModel, generate_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PageInput:
    """A page to generate for. `key` tells pages of different documents apart in one call (the
    engine uses the result id); without it the page number is the key."""

    page_number: int
    text: str
    key: int | None = None

    @property
    def ident(self) -> int:
        return self.page_number if self.key is None else self.key


@dataclass
class CallRecord:
    """One model call over some pages: its outcome and the memory measured around it."""

    call_id: str
    pages: list[int]  # the pages' keys (`PageInput.ident`)
    outcome: str  # ok | oom | timeout | error
    error_type: str | None
    error_message: str | None
    device: str
    started_at: datetime
    finished_at: datetime
    infer_seconds: float
    generations: dict[int, Generation] = field(default_factory=dict)
    torch_max_allocated_bytes: int | None = None
    torch_max_reserved_bytes: int | None = None
    before: gpu.MemorySnapshot = field(default_factory=gpu.MemorySnapshot)
    after: gpu.MemorySnapshot = field(default_factory=gpu.MemorySnapshot)
    rss_bytes: int | None = None
    batching: str = "static"  # static | continuous (vramflow.continuous)
    retried: bool = False  # its pages went on to another call whatever its outcome

    @property
    def final_failure(self) -> bool:
        """Whether this call settles its pages as failed: not when it succeeded, when its pages
        were handed on, or when it ran out of memory on several pages (they are split)."""
        if self.outcome == "ok" or self.retried:
            return False
        return self.outcome != "oom" or len(self.pages) == 1


@dataclass
class BatchOutcome:
    done: dict[int, tuple[Generation, CallRecord]] = field(default_factory=dict)
    failed: dict[int, CallRecord] = field(default_factory=dict)

    @property
    def oom_failed(self) -> list[int]:
        return sorted(p for p, call in self.failed.items() if call.outcome == "oom")


class BatchLimit:
    """Most pages per call known to fit on a device, learnt from out-of-memory errors.

    No limit until a call of several pages runs out of memory; then the size its halves were
    given, and the limit doubles again after `grow_after` calls in a row that fit (memory that
    other processes held may have come back).
    """

    def __init__(self, grow_after: int = 8) -> None:
        self.grow_after = grow_after
        self.max_pages: int | None = None
        self._fits_in_a_row = 0
        self._lock = threading.Lock()

    def chunks(self, pages: list[PageInput]) -> list[list[PageInput]]:
        """`pages` cut into calls of at most the limit."""
        with self._lock:
            size = self.max_pages or len(pages) or 1
        return [pages[start : start + size] for start in range(0, len(pages), size)]

    def ran_out(self, pages: int) -> None:
        if pages < 2:
            return  # one page too large to fit alone says nothing about batches
        with self._lock:
            self.max_pages = min(self.max_pages or pages, pages // 2)
            self._fits_in_a_row = 0

    def fitted(self, pages: int) -> None:
        with self._lock:
            if self.max_pages is None or pages < self.max_pages:
                return
            self._fits_in_a_row += 1
            if self._fits_in_a_row >= self.grow_after:
                self.max_pages *= 2
                self._fits_in_a_row = 0


_limits: dict[tuple[str, str], BatchLimit] = {}
_limits_lock = threading.Lock()


def batch_limit(model: str, device: str) -> BatchLimit:
    """This process's limit for `model` on `device`."""
    with _limits_lock:
        return _limits.setdefault((model, device), BatchLimit())


def forget_batch_limits() -> None:
    """Drop every limit this process has learnt (for a device whose memory use has changed)."""
    with _limits_lock:
        _limits.clear()


@dataclass(frozen=True)
class GenerationSettings:
    prompt: str
    device: str
    max_new_tokens: int
    max_input_tokens: int
    timeout_s: float


def call_model(
    loaded: LoadedModel,
    pages: list[PageInput],
    cfg: GenerationSettings,
    injector: OomInjector | None,
    generate: Callable[..., list[Generation]] | None = None,
) -> CallRecord:
    """One model call (`generate`, static `generate_batch` by default, with generate_batch's
    arguments); failures are caught and classified, never raised."""
    numbers = [p.ident for p in pages]
    gpu.reset_peaks(cfg.device)
    before = gpu.nvml_snapshot(cfg.device)
    started_at, started = datetime.now(timezone.utc), time.perf_counter()
    generations: dict[int, Generation] = {}
    outcome, error_type, message = "ok", None, None
    try:
        if injector:
            injector.check([p.page_number for p in pages])
        outputs = torch_thread.run(
            generate or generate_batch,
            loaded,
            cfg.prompt,
            [p.text for p in pages],
            device=cfg.device,
            max_new_tokens=cfg.max_new_tokens,
            max_input_tokens=cfg.max_input_tokens,
            timeout_s=cfg.timeout_s,
        )
        generations = dict(zip(numbers, outputs, strict=True))
    except InferenceTimeoutError as exc:
        outcome, error_type, message = "timeout", type(exc).__name__, str(exc)
    except Exception as exc:  # classify, keep only the message: the traceback pins tensors
        outcome = "oom" if gpu.is_oom(exc) else "error"
        error_type, message = type(exc).__name__, str(exc).splitlines()[0][:2000]
    record = CallRecord(
        call_id=str(uuid.uuid4()),
        pages=numbers,
        outcome=outcome,
        error_type=error_type,
        error_message=message,
        device=cfg.device,
        started_at=started_at,
        finished_at=datetime.now(timezone.utc),
        infer_seconds=time.perf_counter() - started,
        generations=generations,
        before=before,
        rss_bytes=psutil.Process().memory_info().rss,
    )
    record.torch_max_allocated_bytes, record.torch_max_reserved_bytes = gpu.torch_peaks(cfg.device)
    if outcome != "ok":
        gpu.free_memory(cfg.device)  # outside the except block, so the failed frame is gone
    record.after = gpu.nvml_snapshot(cfg.device)
    return record


def run_batch(
    loaded: LoadedModel,
    pages: list[PageInput],
    cfg: GenerationSettings,
    *,
    injector: OomInjector | None = None,
    on_call: Callable[[CallRecord], None] = lambda record: None,
    limit: BatchLimit | None = None,
) -> BatchOutcome:
    """Generate for every page; on OOM split the batch in halves and retry, down to one page.

    With a `limit`, the batch starts cut to the size that last fitted, an out-of-memory error
    also cuts the calls still queued, and every call teaches the limit.
    """
    outcome = BatchOutcome()
    queue = limit.chunks(pages) if limit else [pages]
    if len(queue) > 1:
        log.info(
            "%d pages run as %d calls of at most %d: larger calls ran out of memory before",
            len(pages),
            len(queue),
            len(queue[0]),
        )
    while queue:
        chunk = queue.pop(0)
        record = call_model(loaded, chunk, cfg, injector)
        on_call(record)
        if limit and record.outcome == "ok":
            limit.fitted(len(chunk))
        elif limit and record.outcome == "oom":
            limit.ran_out(len(chunk))
        if record.outcome == "ok":
            for number in record.pages:
                outcome.done[number] = (record.generations[number], record)
        elif record.outcome == "oom" and len(chunk) > 1:
            half = len(chunk) // 2
            log.warning(
                "out of memory on %d pages; retrying as %d + %d",
                len(chunk),
                half,
                len(chunk) - half,
            )
            queue[:0] = [chunk[:half], chunk[half:]]
            if limit:  # calls still queued at a size that just failed would fail too
                queue = [part for queued in queue for part in limit.chunks(queued)]
        else:
            for number in record.pages:
                outcome.failed[number] = record
    return outcome
