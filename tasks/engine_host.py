"""The engine of this process (vramflow.engine), wired to the GPU slot and the database.

One engine per device and slot configuration in a process. In a `vramflow gpu-worker` the
worker's own settings choose the device and slot (`serve_as_gpu_worker`); in a flow process
running the embedded default, the settings of the first batch do.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from vramflow import admission, gpu, metrics, models, slot_records, torch_thread
from vramflow.config import Settings
from vramflow.db import queries
from vramflow.db.session import session_scope
from vramflow.engine import CallGroup, Engine, EngineParts, PageJob
from vramflow.inference import CallRecord
from vramflow.tasks.gpu_slot import gpu_slot
from vramflow.tasks.recording import store_call

_engines: dict[tuple[Any, ...], Engine] = {}
# Held for good by `stop_writes` once `vramflow run` is interrupted: the answers counted for the
# interruption's message are then the ones stored.
_writes = threading.Lock()
_lock = threading.Lock()
_worker_settings: Settings | None = None
_worker_id: str | None = None


def serve_as_gpu_worker(settings: Settings, worker_id: str) -> None:
    """From now on this process's engine follows `settings` (device, slot, dtype), whatever
    settings a batch brings; its claims on pages carry `worker_id`."""
    global _worker_settings, _worker_id
    _worker_settings, _worker_id = settings, worker_id


def stop_writes() -> None:
    """Store no more answers in this process (it is about to exit); waits for a write under way."""
    _writes.acquire()


def worker_id() -> str | None:
    """The GPU worker this process is, if it is one."""
    return _worker_id


def engine_for(settings: Settings) -> Engine:
    """This process's engine for the device and slot that `settings` (or the GPU worker's own
    settings) name, started on first use."""
    own = _worker_settings or settings
    device = gpu.resolve_device(own.device)
    key = (
        device,
        own.dtype,
        own.model_cache_dir,
        own.slot_name_template,
        own.slot_size,
        own.slot_lease_seconds,
        own.slot_wait_seconds,
        own.slot_records_dir,
        own.slot_handoff_seconds,
        own.torch_threads,
        own.continuous_batching,
        own.admission,
        own.device_memory_mib,
        own.memory_margin_mib,
    )
    with _lock:
        if key not in _engines:
            _engines[key] = Engine(engine_parts(own, device))
        return _engines[key]


def call_group(settings: Settings) -> CallGroup:
    """What a batch shares with the batches it may be merged with."""
    return CallGroup(
        database_url=settings.resolved_database_url,
        model=settings.model,
        prompt=settings.prompt,
        max_new_tokens=settings.max_new_tokens,
        max_input_tokens=settings.max_input_tokens,
        timeout_s=settings.inference_timeout_seconds,
        inject_oom=settings.inject_oom,
    )


def loaded_models() -> int:
    """Models held by this process (each loaded once)."""
    return models.cached_count()


def engine_parts(settings: Settings, device: str) -> EngineParts:
    """The slot, loader, recorder and grants an engine for `device` uses under `settings`."""
    name = gpu.slot_name(settings.slot_name_template, device)
    records = settings.slot_records_dir
    dtype = models.resolve_dtype(settings.dtype, device)
    grants = Grants(settings, device)

    def slot(loaded: models.LoadedModel):
        return gpu_slot(
            name,
            size=grants.limit_size(),
            occupy=grants.need(loaded),
            lease_seconds=settings.slot_lease_seconds,
            wait_seconds=settings.slot_wait_seconds,
            records_dir=records,
        )

    def load(spec: str) -> models.LoadedModel:
        if (cached := models.cached_model(spec, dtype)) is not None:
            return cached
        loaded = torch_thread.run(models.load_model, spec, settings.model_cache_dir, dtype)
        metrics.model_loaded()
        return loaded

    def should_yield(held_seconds: float) -> bool:
        # The device is this process's while pages wait, up to the hand-off time; past it, the
        # slot goes back to the server when another process of this host waits for it (or when
        # the line cannot be read, so that a broken line never keeps the device from others).
        if held_seconds < settings.slot_handoff_seconds:
            return False
        try:
            return slot_records.others_waiting(records, name)
        except OSError:
            return True

    return EngineParts(
        device=device,
        slot=slot,
        load=load,
        recorder=DatabaseRecorder(name, grants),
        torch_threads=settings.torch_threads,
        should_yield=should_yield,
        token_cap=grants.token_cap,
        continuous=settings.continuous_batching,
    )


class Grants:
    """What a device's slot counts and what a holder asks for (vramflow.admission): one slot
    per holder, or MiB of the device, with each model's need learnt from its recorded peaks."""

    def __init__(self, settings: Settings, device: str) -> None:
        self.settings, self.device = settings, device
        self.by_memory = settings.admission == "memory"
        self._peaks: dict[str, int] = {}

    def limit_size(self) -> int:
        if not self.by_memory:
            return self.settings.slot_size
        total = admission.device_mib(self.device, self.settings.device_memory_mib)
        return max(1, total - self.settings.memory_margin_mib)

    def tokens(self) -> int:
        """Tokens in flight the grant is sized for: the token budget, or a full batch."""
        s = self.settings
        return s.max_batch_tokens or s.batch_size * (s.max_input_tokens + s.max_new_tokens)

    def need(self, loaded: models.LoadedModel) -> int:
        if not self.by_memory:
            return 1
        shape = admission.model_shape(loaded.model)
        return admission.need_mib(shape, self.tokens(), self._peaks.get(loaded.spec))

    def token_cap(self, loaded: models.LoadedModel) -> int | None:
        """With memory admission, calls stay within what the grant leaves after the weights."""
        if not self.by_memory:
            return None
        shape = admission.model_shape(loaded.model)
        return min(self.tokens(), admission.tokens_within(shape, self.need(loaded)))

    def learn(self, model: str, record: CallRecord) -> None:
        """Remember the largest device memory a call of `model` reserved (CUDA only)."""
        peak = record.torch_max_reserved_bytes
        if peak:
            self._peaks[model] = max(peak, self._peaks.get(model, 0))


class DatabaseRecorder:
    """Writes holds, attempts and results to the database of the pages' run."""

    def __init__(self, slot_name: str, grants: Grants) -> None:
        self.slot_name, self.grants = slot_name, grants

    def hold_started(self, group: CallGroup, hold_id: str, hold: Any, device: str) -> None:
        metrics.slot_waited(hold.wait_seconds)
        with session_scope(group.database_url) as session:
            queries.record_hold(
                session,
                hold_id=hold_id,
                slot_name=self.slot_name,
                device=device,
                host=socket.gethostname(),
                pid=os.getpid(),
                flow_run_id=None,
                pages=0,
                wait_seconds=hold.wait_seconds,
                acquired_at=hold.acquired_at,
            )

    def call_finished(
        self,
        group: CallGroup,
        record: CallRecord,
        jobs: dict[int, PageJob],
        hold_id: str,
        slot_wait: float,
    ) -> None:
        runs = {key: job.flow_run_id for key, job in jobs.items()}
        self.grants.learn(group.model, record)
        metrics.record_call(record)
        if record.outcome == "ok":
            metrics.pages_finished(ok=len(record.pages), failed=0)
        elif record.final_failure:  # not split or handed on and tried again
            metrics.pages_finished(ok=0, failed=len(record.pages))
        with _writes, session_scope(group.database_url) as session:
            store_call(session, record, {key: key for key in jobs}, hold_id, slot_wait, runs)
            if record.outcome == "ok":
                queries.count_hold_pages(session, hold_id, len(record.pages), runs.values())

    def hold_finished(
        self,
        group: CallGroup,
        hold_id: str,
        hold: Any,
        move_in: float,
        move_out: float,
        pages: int,
    ) -> None:
        if hold.released_at is not None:
            metrics.slot_held((hold.released_at - hold.acquired_at).total_seconds())
        with session_scope(group.database_url) as session:
            queries.finish_hold(
                session,
                hold_id,
                released_at=hold.released_at,
                move_in_seconds=move_in,
                move_out_seconds=move_out,
            )
