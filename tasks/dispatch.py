"""How a flow run gets a batch answered: by its own engine, or by the GPU workers.

`start_batch` returns a handle whose `wait()` (blocking; the flow calls it in a thread) returns
once the batch's pages are settled, and whose `failure` says why the batch failed, if it did.

Sent to the GPU workers (`infer_batch.delay()`), the task run is delivered by the Prefect server
to a `vramflow gpu-worker` serving the task. A delivery can be lost (the server keeps its queue in
memory) and a worker can die mid-batch, so a batch is never waited on blindly:
- not taken while no GPU worker is alive for `gpu_worker_wait_seconds`: the batch fails, its
  pages are stored as failed with a message saying to start one;
- not taken for that long while an idle worker is alive: the delivery was lost; it is cancelled
  and submitted again;
- taken by a worker whose heartbeat stopped: it is cancelled and submitted again.
Resubmitting is safe: the task skips pages already answered, and a task worker caches a
completed run's result by its inputs and flow run, so a second copy of a finished batch does
nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from prefect import Task
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.states import Cancelled

from vramflow.config import Settings
from vramflow.db import queries, workers
from vramflow.db.session import session_scope
from vramflow.errors import NoGpuWorkerError
from vramflow.runs import generation_settings_json, key_parts

log = logging.getLogger(__name__)

# How often a batch sent to the GPU workers is looked at while it is not finished. Its end is
# noticed at once (Prefect's event stream); this only paces the checks for lost work.
CHECK_EVERY_SECONDS = 2.0
# Pause before looking again at a task run the server has not recorded yet.
NOT_RECORDED_PAUSE_SECONDS = 0.2


class BatchRun(Protocol):
    failure: str | None

    def wait(self) -> None: ...


def uses_gpu_workers(settings: Settings) -> bool:
    """Whether batches go to GPU workers (see `Settings.inference`)."""
    if settings.inference != "auto":
        return settings.inference == "gpu-worker"
    return get_current_settings().api.url is not None


def start_batch(
    infer: Task,
    document_id: int,
    batch: list[int],
    settings: Settings,
    force: bool,
    extracts: Sequence[PrefectFuture],
) -> BatchRun:
    """Start answering `batch` once its pages are extracted."""
    if uses_gpu_workers(settings):
        return RemoteBatch(infer, document_id, batch, settings, force, extracts)
    return LocalBatch(infer.submit(document_id, batch, settings, force, wait_for=extracts))


class LocalBatch:
    """A batch answered by this process's engine, in the flow's task runner."""

    def __init__(self, future: PrefectFuture) -> None:
        self.future, self.failure = future, None

    def wait(self) -> None:
        self.future.wait()
        state = self.future.state
        if state.is_failed() or state.is_crashed():
            self.failure = state.message or state.name


class RemoteBatch:
    """A batch sent to the GPU workers, resent when its delivery or its worker is lost."""

    def __init__(
        self,
        infer: Task,
        document_id: int,
        batch: list[int],
        settings: Settings,
        force: bool,
        extracts: Sequence[PrefectFuture],
    ) -> None:
        self.infer, self.document_id, self.batch = infer, document_id, batch
        self.settings, self.force, self.extracts = settings, force, extracts
        self.key = queries.ResultKey(document_id, *key_parts(settings))
        self.failure: str | None = None
        self.submissions = 0

    def wait(self) -> None:
        for extract in self.extracts:
            extract.wait()
        future, sent = self._submit(), time.monotonic()
        # One API client for the whole wait: one per look costs a new TLS context each time,
        # CPU that a sweep's documents, all waiting in one process, pay together.
        with get_client(sync_client=True) as client:
            while True:
                state = _read_state(client, future)
                if state is not None and state.is_final():
                    if state.is_failed() or state.is_crashed() or state.is_cancelled():
                        self.failure = state.message or state.name
                    return
                verdict = self._check(state, time.monotonic() - sent)
                if verdict == "give up":
                    _cancel(client, future, "no GPU worker took this batch")
                    self._fail_pages()
                    return
                if verdict == "resend":
                    _cancel(client, future, "sent again: its delivery or its GPU worker was lost")
                    future, sent = self._submit(), time.monotonic()
                    continue
                _wait_a_while(future, recorded=state is not None)

    def _submit(self) -> PrefectFuture:
        self.submissions += 1
        return self.infer.delay(self.document_id, self.batch, self.settings, self.force)

    def _check(self, state: Any, waited: float) -> str:
        """'wait', 'resend' or 'give up', from the task run's state and the workers' health."""
        timeout = self.settings.gpu_worker_timeout_seconds
        with session_scope(self.settings.resolved_database_url) as session:
            live = {w.id: w for w in workers.alive(session, timeout)}
            claimed_by = workers.claims(session, self.key, self.batch)
        if state is not None and state.is_running():
            lost = claimed_by - live.keys()
            if not claimed_by and not live and waited >= timeout:
                lost = {"(none alive)"}
            if lost:
                log.warning(
                    "pages %s: GPU worker %s stopped; sending them again",
                    self.batch,
                    ", ".join(sorted(lost)),
                )
                return "resend"
            return "wait"
        if waited < self.settings.gpu_worker_wait_seconds:
            return "wait"
        if not live:
            return "give up"
        if all(w.pages_waiting == 0 for w in live.values()):
            log.warning("pages %s: not delivered to an idle GPU worker; sending again", self.batch)
            return "resend"
        return "wait"

    def _fail_pages(self) -> None:
        self.failure = (
            f"no GPU worker took pages {self.batch} within "
            f"{self.settings.gpu_worker_wait_seconds:g} s: start one with `vramflow gpu-worker`"
            " beside the Prefect server (VRAMFLOW_GPU_WORKER_WAIT_SECONDS sets the wait)"
        )
        with session_scope(self.settings.resolved_database_url) as session:
            queries.fail_results(
                session,
                self.key,
                self.batch,
                self.settings.prompt,
                generation_settings_json(self.settings),
                flow_run.id,
                NoGpuWorkerError.__name__,
                self.failure,
            )


def _wait_a_while(future: PrefectFuture, recorded: bool) -> None:
    """Until the task run ends, or for CHECK_EVERY_SECONDS. Prefect's wait refuses a task run
    the server has not recorded yet (it writes task runs in batches): then pause briefly."""
    if not recorded:
        time.sleep(NOT_RECORDED_PAUSE_SECONDS)
        return
    try:
        future.wait(timeout=CHECK_EVERY_SECONDS)
    except RuntimeError:  # "has no state which means it hasn't started yet"
        time.sleep(NOT_RECORDED_PAUSE_SECONDS)


def _read_state(client: SyncPrefectClient, future: PrefectFuture) -> Any | None:
    """The task run's state; None while the server has not recorded it yet (it writes task-run
    states in batches)."""
    try:
        return client.read_task_run(future.task_run_id).state
    except ObjectNotFound:
        return None


def _cancel(client: SyncPrefectClient, future: PrefectFuture, why: str) -> None:
    """Mark a task run given up on as Cancelled, so that a late delivery does not run it."""
    client.set_task_run_state(future.task_run_id, Cancelled(message=why), force=True)
