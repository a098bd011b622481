"""`vramflow gpu-worker`: a long-lived process that keeps the model loaded and answers the
batches of every flow run, served through Prefect's task workers.

The process registers itself in the database and records a heartbeat, so that waiting flow runs
can tell a dead worker from a busy one (vramflow.tasks.dispatch). Its engine
(vramflow.tasks.engine_host) follows the worker's own settings for the device and the GPU slot.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import get_current_settings
from prefect.task_worker import serve

from vramflow import gpu, metrics, models, torch_thread
from vramflow.config import Settings
from vramflow.db import workers
from vramflow.db.schema import ensure_schema
from vramflow.db.session import session_scope
from vramflow.errors import ConfigError
from vramflow.tasks import engine_host
from vramflow.tasks.gpu_slot import ensure_slot_limit
from vramflow.tasks.infer import infer_batch

log = logging.getLogger(__name__)


def run_gpu_worker(settings: Settings, limit: int, preload: list[str]) -> None:
    """Serve the inference task until stopped (Ctrl-C, SIGTERM)."""
    if not get_current_settings().api.url:
        raise ConfigError(
            "vramflow gpu-worker needs a Prefect server: start one with `prefect server start`"
            " and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)"
        )
    url = settings.resolved_database_url
    ensure_schema(url)
    device = gpu.resolve_device(settings.device)
    size = engine_host.Grants(settings, device).limit_size()
    ensure_slot_limit(gpu.slot_name(settings.slot_name_template, device), size)
    with registered(settings, device) as worker_id:
        engine_host.serve_as_gpu_worker(settings, worker_id)
        dtype = models.resolve_dtype(settings.dtype, device)
        for spec in preload:
            torch_thread.run(models.load_model, spec, settings.model_cache_dir, dtype)
            metrics.model_loaded()
            log.info("model %s loaded", spec)
        engine_host.engine_for(settings)  # its thread is ready before the first batch
        log.info("GPU worker %s serving device %s (pid %d)", worker_id, device, os.getpid())
        task = infer_batch.with_options(
            retries=settings.oom_retries, retry_delay_seconds=settings.oom_retry_delay_seconds
        )
        serve(task, limit=limit)


@contextmanager
def registered(settings: Settings, device: str) -> Iterator[str]:
    """This process as a GPU worker in the database, with a heartbeat, until the block ends."""
    worker_id, url = str(uuid.uuid4()), settings.resolved_database_url
    with session_scope(url) as session:
        workers.register(
            session, worker_id, socket.gethostname(), os.getpid(), device, "gpu-worker"
        )
    stop = threading.Event()
    beating = threading.Thread(
        target=_heartbeat, args=(settings, worker_id, stop), name="vramflow-heartbeat", daemon=True
    )
    beating.start()
    try:
        yield worker_id
    finally:
        stop.set()
        beating.join()
        with session_scope(url) as session:
            workers.stopped(session, worker_id)


def _heartbeat(settings: Settings, worker_id: str, stop: threading.Event) -> None:
    while not stop.wait(settings.gpu_worker_heartbeat_seconds):
        try:
            waiting = engine_host.engine_for(settings).pages_waiting
            metrics.pages_waiting.set(waiting)
            with session_scope(settings.resolved_database_url) as session:
                workers.beat(session, worker_id, waiting, models.cached_count())
        except Exception as exc:  # a missed beat is retried; the worker goes on
            log.warning("heartbeat not recorded: %s", exc)
