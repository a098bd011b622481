"""Run a batch of pages through the model, splitting it on out-of-memory down to one page.

Plain Python: the caller holds the GPU slot and has moved the weights; every model call is
reported through `on_attempt` as soon as it ends, so the database never lags the work.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psutil

from vramflow import gpu
from vramflow.errors import InferenceTimeoutError
from vramflow.faults import OomInjector
from vramflow.models import Generation, LoadedModel, generate_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PageInput:
    page_number: int
    text: str


@dataclass
class CallRecord:
    """One model call over some pages: its outcome and the memory measured around it."""

    call_id: str
    pages: list[int]
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


@dataclass
class BatchOutcome:
    done: dict[int, tuple[Generation, CallRecord]] = field(default_factory=dict)
    failed: dict[int, CallRecord] = field(default_factory=dict)

    @property
    def oom_failed(self) -> list[int]:
        return sorted(p for p, call in self.failed.items() if call.outcome == "oom")


@dataclass(frozen=True)
class GenerationSettings:
    prompt: str
    device: str
    max_new_tokens: int
    max_input_tokens: int
    timeout_s: float


def _call(
    loaded: LoadedModel,
    pages: list[PageInput],
    cfg: GenerationSettings,
    injector: OomInjector | None,
) -> CallRecord:
    """One model call; failures are caught and classified, never raised."""
    numbers = [p.page_number for p in pages]
    gpu.reset_peaks(cfg.device)
    before = gpu.nvml_snapshot(cfg.device)
    started_at, started = datetime.now(timezone.utc), time.perf_counter()
    generations: dict[int, Generation] = {}
    outcome, error_type, message = "ok", None, None
    try:
        if injector:
            injector.check(numbers)
        outputs = generate_batch(
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
) -> BatchOutcome:
    """Generate for every page; on OOM split the batch in halves and retry, down to one page."""
    outcome = BatchOutcome()
    queue = [pages]
    while queue:
        chunk = queue.pop(0)
        record = _call(loaded, chunk, cfg, injector)
        on_call(record)
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
        else:
            for number in record.pages:
                outcome.failed[number] = record
    return outcome
