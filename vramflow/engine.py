"""The inference engine of a process: pages from every run share its model calls.

A process that runs inference (a `vramflow gpu-worker`, or a flow process running the embedded
default) has one engine per device and configuration. A request is one batch of pages of one
document run. Requests wait here; one thread takes the device's slot, brings the model onto the
device and makes model calls of up to `batch_size` pages (or of pages of similar length within a
token budget, vramflow.batching), static or, when asked for, through continuous batching
(vramflow.continuous), taking pages in arrival order from every waiting request that shares the
database, model and generation settings, so that pages of different documents share a call. The
thread keeps the slot, with the weights on the device, while pages wait, and gives it back when
none do, or when `should_yield` says another process wants the device.

Plain Python: the caller provides the slot, the model loader and the recorder (database writes).
Recorder calls run in order on one writer thread, so the next call generates while the answers
of the last are stored; a request is answered only after its pages' writes are done.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from vramflow import batching, continuous, models, residency, torch_thread
from vramflow.errors import ModelError, SlotError
from vramflow.faults import injector_for
from vramflow.inference import (
    BatchOutcome,
    CallRecord,
    GenerationSettings,
    PageInput,
    batch_limit,
    run_batch,
)

log = logging.getLogger(__name__)

# A model that failed to load fails later requests at once for this long, then is tried again.
LOAD_FAILURE_MEMORY_SECONDS = 60.0


@dataclass(frozen=True)
class CallGroup:
    """What pages must share to be generated in one call (and stored in one database)."""

    database_url: str
    model: str
    prompt: str
    max_new_tokens: int
    max_input_tokens: int
    timeout_s: float
    inject_oom: str | None = None


@dataclass(frozen=True)
class PageJob:
    """One page to answer: `page.key` is its result id, unique across documents."""

    page: PageInput
    flow_run_id: str | None


@dataclass
class RequestOutcome:
    """What became of a request's pages, by page number."""

    ok: list[int]
    failed: dict[int, str]  # page number → "Type: message"
    oom_failed: list[int]
    queued_seconds: float  # from submission to the first call carrying one of its pages
    slot_wait_seconds: float  # of that, waiting for other holders of the device


@dataclass
class _Request:
    group: CallGroup
    jobs: list[PageJob]
    batch_size: int
    token_budget: int | None = None
    future: Future[RequestOutcome] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)
    pending: deque[PageJob] = field(init=False)
    outcome: BatchOutcome = field(default_factory=BatchOutcome)
    writes: list[Future] = field(default_factory=list)
    first_call_at: float | None = None
    slot_wait: float = 0.0

    def __post_init__(self) -> None:
        self.pending = deque(self.jobs)

    @property
    def settled(self) -> bool:
        return len(self.outcome.done) + len(self.outcome.failed) == len(self.jobs)


class Recorder(Protocol):
    """Where the engine writes what it did (the database, in vramflow)."""

    def hold_started(self, group: CallGroup, hold_id: str, hold: Any, device: str) -> None: ...

    def call_finished(
        self,
        group: CallGroup,
        record: CallRecord,
        jobs: dict[int, PageJob],
        hold_id: str,
        slot_wait: float,
    ) -> None: ...

    def hold_finished(
        self,
        group: CallGroup,
        hold_id: str,
        hold: Any,
        move_in: float,
        move_out: float,
        pages: int,
    ) -> None: ...


@dataclass
class EngineParts:
    """What an engine is given: how to take the slot, load a model and record its work."""

    device: str
    slot: Callable[[Any], AbstractContextManager[Any]]  # for a loaded model: its hold
    load: Callable[[str], Any]  # model spec → models.LoadedModel (on the CPU)
    recorder: Recorder
    torch_threads: int | None = None
    should_yield: Callable[[float], bool] = lambda held_seconds: False
    # The most tokens in flight a call of this model may hold (its grant), or None.
    token_cap: Callable[[Any], int | None] = lambda loaded: None
    # Answer each call through transformers' continuous batching where it runs the model.
    continuous: bool = False


class Engine:
    """Requests in, one model call at a time on the device, answers out."""

    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts
        self.models_loaded = 0
        self._requests: deque[_Request] = deque()
        self._changed = threading.Condition()
        self._load_failures: dict[str, tuple[str, float]] = {}
        self._in_call: list[_Request] = []  # requests with pages in the call being made
        self._lengths = batching.PromptLengths()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramflow-writes")
        self._thread = threading.Thread(target=self._run, name="vramflow-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        group: CallGroup,
        jobs: list[PageJob],
        batch_size: int,
        token_budget: int | None = None,
    ) -> Future:
        """Queue `jobs`; the future gives a RequestOutcome, or raises ModelError / SlotError.

        Calls carry up to `batch_size` pages, or with a `token_budget`, as many pages of
        similar length as fit it (vramflow.batching)."""
        request = _Request(group, list(jobs), max(1, batch_size), token_budget)
        if not request.jobs:
            request.future.set_result(RequestOutcome([], {}, [], 0.0, 0.0))
            return request.future
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()
        return request.future

    @property
    def pages_waiting(self) -> int:
        with self._changed:
            return sum(len(r.pending) for r in self._requests)

    # The engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            group = self._wait_for_work()
            loaded = self._load(group)
            if loaded is None:
                continue
            try:
                self._hold_and_serve(group, loaded)
            except BaseException as exc:  # no slot, or it was lost (a cancellation) mid-call
                log.error("the device's slot failed: %s", _one_line(exc))
                failure = exc if isinstance(exc, Exception) else SlotError(_one_line(exc))
                self._fail_requests(self._in_call, failure)
                self._fail_group(group, failure)

    def _wait_for_work(self) -> CallGroup:
        with self._changed:
            while not any(r.pending for r in self._requests):
                self._changed.wait()
            return next(r for r in self._requests if r.pending).group

    def _hold_and_serve(self, group: CallGroup, loaded: Any) -> None:
        hold_id = str(uuid.uuid4())
        with self.parts.slot(loaded) as hold:
            self._write(self.parts.recorder.hold_started, group, hold_id, hold, self.parts.device)
            move_in, move_out, pages = self._serve(hold, hold_id, loaded)
        self._write(
            self.parts.recorder.hold_finished, group, hold_id, hold, move_in, move_out, pages
        )

    def _serve(self, hold: Any, hold_id: str, loaded: Any) -> tuple[float, float, int]:
        """Model calls of `loaded` while its pages wait, within its grant; the weights leave
        the device before the slot does. Another model's turn takes a hold of its own (its
        grant differs)."""
        device, started = self.parts.device, time.monotonic()
        cap = self.parts.token_cap(loaded)
        move_in = torch_thread.run(residency.bring_in, loaded, device, self.parts.torch_threads)
        move_out, pages, wait = 0.0, 0, hold.wait_seconds
        try:
            while (taken := self._take(loaded, cap)) is not None:
                group, jobs, requests = taken
                self._call(group, loaded, jobs, requests, hold_id, wait, cap)
                pages, wait = pages + len(jobs), 0.0
                if self.parts.should_yield(time.monotonic() - started):
                    break
        finally:
            move_out += residency.take_off(loaded, device)
        return move_in, move_out, pages

    def _take(
        self, loaded: Any, cap: int | None = None
    ) -> tuple[CallGroup, list[PageJob], list[_Request]] | None:
        """The next call's pages, if the oldest waiting request is for `loaded`'s model: of its
        group, chosen by count or by its token budget (vramflow.batching), oldest first, within
        `cap` tokens in flight."""
        with self._changed:
            waiting = [r for r in self._requests if r.pending]
            if not waiting or waiting[0].group.model != loaded.spec:
                return None
            first = waiting[0]
            group = first.group
            queued = [(r, job) for r in waiting if r.group == group for job in r.pending]
            budget = first.token_budget
            if cap is not None:
                budget = min(budget or cap, cap)
            if budget is None:
                picked = batching.by_count(len(queued), first.batch_size)
            else:
                count = models.prompt_tokens if hasattr(loaded, "tokenizer") else None
                lengths = [self._lengths.of(loaded, group, job.page, count) for _, job in queued]
                limit = batching.MAX_PAGES_PER_CALL if first.token_budget else first.batch_size
                picked = batching.by_tokens(lengths, budget, group.max_new_tokens, limit)
            jobs, requests, now = [], [], time.monotonic()
            for request, job in (queued[i] for i in picked):
                self._lengths.forget(group, job.page)
                request.pending.remove(job)
                jobs.append(job)
                if request not in requests:
                    requests.append(request)
                    request.first_call_at = request.first_call_at or now
            return group, jobs, requests

    def _call(
        self,
        group: CallGroup,
        loaded: Any,
        jobs: list[PageJob],
        requests: list[_Request],
        hold_id: str,
        slot_wait: float,
        cap: int | None = None,
    ) -> None:
        by_key = {job.page.ident: job for job in jobs}
        cfg = GenerationSettings(
            group.prompt,
            self.parts.device,
            group.max_new_tokens,
            group.max_input_tokens,
            group.timeout_s,
        )

        def on_call(record: CallRecord) -> None:
            carried = {key: by_key[key] for key in record.pages}
            write = self._write(
                self.parts.recorder.call_finished, group, record, carried, hold_id, slot_wait
            )
            for request in requests:
                request.writes.append(write)
            if record.outcome != "ok":
                log.warning(
                    "%d pages: %s: %s", len(record.pages), record.outcome, record.error_message
                )

        for request in requests:
            request.slot_wait = max(request.slot_wait, slot_wait)
        self._in_call = requests
        run = continuous.runner(self.parts.continuous, loaded, self.parts.device, cap)
        with loaded.lock:
            outcome = (run or run_batch)(
                loaded,
                [job.page for job in jobs],
                cfg,
                injector=injector_for(group.inject_oom),
                on_call=on_call,
                limit=batch_limit(group.model, self.parts.device),
            )
        self._settle(requests, outcome)
        self._in_call = []

    def _settle(self, requests: list[_Request], outcome: BatchOutcome) -> None:
        with self._changed:
            for request in requests:
                keys = {job.page.ident for job in request.jobs}
                request.outcome.done.update({k: v for k, v in outcome.done.items() if k in keys})
                request.outcome.failed.update(
                    {k: v for k, v in outcome.failed.items() if k in keys}
                )
                if request.settled and not request.pending:
                    self._requests.remove(request)
                    self._writer.submit(_answer, request)  # after its writes: one writer thread

    def _load(self, group: CallGroup) -> Any | None:
        """The group's model, loaded once per process; None (its requests failed) if it cannot
        be loaded."""
        failure = self._load_failures.get(group.model)
        if failure and time.monotonic() - failure[1] < LOAD_FAILURE_MEMORY_SECONDS:
            self._fail_group(group, ModelError(failure[0]), same_model=True)
            return None
        try:
            loaded = self.parts.load(group.model)
        except Exception as exc:
            message = (
                str(exc).splitlines()[0]
                if isinstance(exc, ModelError)
                else f"cannot load model {group.model}: {_one_line(exc)}"
            )
            log.error("%s", message)
            self._load_failures[group.model] = (message, time.monotonic())
            self._fail_group(group, ModelError(message), same_model=True)
            return None
        self._load_failures.pop(group.model, None)
        return loaded

    def _fail_group(self, group: CallGroup, exc: Exception, same_model: bool = False) -> None:
        """Fail every waiting request of `group` (of its model, with `same_model`)."""
        self._fail_where(
            lambda r: (
                bool(r.pending)
                and (r.group.model == group.model if same_model else r.group == group)
            ),
            exc,
        )

    def _fail_requests(self, requests: list[_Request], exc: Exception) -> None:
        """Fail requests whose pages were in a call that broke off."""
        self._fail_where(lambda r: r in requests, exc)
        self._in_call = []

    def _fail_where(self, chosen: Callable[[_Request], bool], exc: Exception) -> None:
        with self._changed:
            failed = [r for r in self._requests if chosen(r)]
            for request in failed:
                self._requests.remove(request)
                request.pending.clear()
        for request in failed:
            self._writer.submit(request.future.set_exception, exc)

    def _write(self, fn: Callable[..., None], *args: Any) -> Future:
        return self._writer.submit(fn, *args)


def _answer(request: _Request) -> None:
    """Resolve a request once its writes are done (runs on the writer thread, after them)."""
    errors = [w.exception() for w in request.writes if w.exception() is not None]
    if errors:
        request.future.set_exception(errors[0])
        return
    number = {job.page.ident: job.page.page_number for job in request.jobs}
    failed = request.outcome.failed
    started = request.first_call_at or request.queued_at
    request.future.set_result(
        RequestOutcome(
            ok=sorted(number[key] for key in request.outcome.done),
            failed={number[k]: f"{r.error_type}: {r.error_message}" for k, r in failed.items()},
            oom_failed=sorted(number[k] for k, r in failed.items() if r.outcome == "oom"),
            queued_seconds=started - request.queued_at,
            slot_wait_seconds=request.slot_wait,
        )
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
