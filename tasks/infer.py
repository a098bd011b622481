"""Prefect task: run a batch of pages through the model while holding the device's GPU slot."""

from __future__ import annotations

import os
import socket
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks.gpu_slot import Resident, SlotHold, gpu_slot
from tasks.recording import store_call
from vramflow import gpu, models, torch_thread
from vramflow.config import Settings
from vramflow.db import queries
from vramflow.db.session import session_scope
from vramflow.errors import InferenceOOMError
from vramflow.faults import injector_for
from vramflow.inference import GenerationSettings, PageInput, batch_limit, run_batch
from vramflow.runs import generation_settings_json, key_parts

# Stores model answers for the inference tasks of this process, in the order they come.
_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramflow-answers")


def retry_only_oom(task, task_run, state) -> bool:
    """Prefect retries the task only when it failed with an out-of-memory error."""
    try:
        state.result()
    except InferenceOOMError:
        return True
    except Exception:
        return False
    return False


def _take_off(loaded: models.LoadedModel, device: str) -> float:
    """Move the weights off `device` and hand its cached memory back to the driver.

    Only when the slot leaves this process's model: a garbage collection and `empty_cache` cost
    a few hundred ms in a loaded process, which a hand-off to the next batch need not pay.
    Returns the seconds the move took.
    """
    seconds = torch_thread.run(models.move_model, loaded, "cpu")
    gpu.free_memory(device)
    return seconds


def _bring_in(loaded: models.LoadedModel, device: str, torch_threads: int | None) -> float:
    """On the torch thread, holding the slot: torch's thread count, then the weights onto
    `device`. Returns the seconds the move took."""
    models.use_torch_threads(torch_threads)
    return models.move_model(loaded, device)


def _claim_pages(
    document_id: int, pages: list[int], settings: Settings, force: bool, run_id: str | None
):
    """Pages of this batch still to do: not done already (with `force`: not done by this run,
    so a Prefect retry does not redo what its first try finished)."""
    key = queries.ResultKey(document_id, *key_parts(settings))
    with session_scope(settings.resolved_database_url) as session:
        done = queries.done_pages(session, key, only_run=run_id if force else None)
        todo = [p for p in pages if p not in done]
        texts = queries.page_texts(session, document_id, todo)
        wanted = {"ok"} if settings.skip_no_text else {"ok", "no_text"}
        todo = [p for p in todo if p in texts and texts[p].status in wanted]
        inputs = [PageInput(p, texts[p].text) for p in todo]
        ids = queries.start_results(
            session, key, todo, settings.prompt, generation_settings_json(settings), run_id
        )
    return inputs, ids


def _record_hold(
    url: str, hold: SlotHold, hold_id: str, device: str, run_id: str | None, pages: int
) -> None:
    with session_scope(url) as session:
        queries.record_hold(
            session,
            hold_id=hold_id,
            slot_name=hold.name,
            device=device,
            host=socket.gethostname(),
            pid=os.getpid(),
            flow_run_id=run_id,
            pages=pages,
            wait_seconds=hold.wait_seconds,
            acquired_at=hold.acquired_at,
        )


@task(
    name="infer-batch",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_only_oom,
    task_run_name="infer pages {pages}",
)
def infer_batch(
    document_id: int, pages: list[int], settings: Settings, force: bool = False
) -> dict[str, int]:
    """Generate answers for `pages`; the weights are on the GPU only while the slot is held."""
    logger, run_id = get_run_logger(), flow_run.id
    inputs, result_ids = _claim_pages(document_id, pages, settings, force, run_id)
    if not inputs:
        return {"ok": 0, "failed": 0}
    device = gpu.resolve_device(settings.device)
    dtype = models.resolve_dtype(settings.dtype, device)
    # Torch work happens on the process's torch thread (see vramflow.torch_thread), which the
    # holder of the slot keeps busy. A loaded model is taken without it, so that this batch
    # gets in line at the slot while the holder generates: a batch that reached the slot only
    # after the holder left found the slot gone back to the server (a round trip, and on a GPU
    # the weights moved off and on again).
    loaded = models.cached_model(settings.model, dtype) or torch_thread.run(
        models.load_model, settings.model, settings.model_cache_dir, dtype
    )
    cfg = GenerationSettings(
        settings.prompt,
        device,
        settings.max_new_tokens,
        settings.max_input_tokens,
        settings.inference_timeout_seconds,
    )
    name, hold_id = gpu.slot_name(settings.slot_name_template, device), str(uuid.uuid4())
    url = settings.resolved_database_url

    writes: list[Future] = []

    def store(record) -> None:
        with session_scope(url) as session:
            store_call(session, record, result_ids, hold_id, hold.wait_seconds, run_id)

    def on_call(record) -> None:
        # Written at once but not by this thread, which has the slot to hand over: the next
        # batch generates while the answers are stored (a commit is 3-5 ms of each hand-off).
        writes.append(_writer.submit(store, record))
        if record.outcome != "ok":
            logger.warning("pages %s: %s: %s", record.pages, record.outcome, record.error_message)

    # With one slot per device the weights (and the allocator's cached blocks) may stay there
    # while the slot passes to the next batch of this process; they leave when a batch of another
    # model takes the slot or it goes back to the server.
    moved_out: list[float] = []
    resident = (
        Resident(key=id(loaded), evict=lambda: moved_out.append(_take_off(loaded, device)))
        if settings.slot_size == 1
        else None
    )
    slot = gpu_slot(
        name,
        size=settings.slot_size,
        lease_seconds=settings.slot_lease_seconds,
        wait_seconds=settings.slot_wait_seconds,
        records_dir=settings.slot_records_dir,
        handoff_seconds=settings.slot_handoff_seconds,
        resident=resident,
    )
    # The model lock keeps one thread of this process using (and moving) the shared weights;
    # taken after the slot, so that the next batch waits at the slot, where it can be handed over.
    try:
        with slot as hold, loaded.lock:
            _record_hold(url, hold, hold_id, device, run_id, len(inputs))
            move_in = torch_thread.run(_bring_in, loaded, device, settings.torch_threads)
            try:
                outcome = run_batch(
                    loaded,
                    inputs,
                    cfg,
                    injector=injector_for(settings.inject_oom),
                    on_call=on_call,
                    limit=batch_limit(settings.model, device),
                )
            finally:
                if resident is None:
                    moved_out.append(_take_off(loaded, device))
    finally:
        for write in writes:  # raises what a write raised
            write.result()

    # One line per batch: every log line is a request to the Prefect API and a database write.
    logger.info(
        "pages %s: %d ok, %d failed (slot %s %s after waiting %.2f s)",
        pages,
        len(outcome.done),
        len(outcome.failed),
        name,
        "handed over" if hold.handed_over else "acquired",
        hold.wait_seconds,
    )
    with session_scope(url) as session:
        queries.finish_hold(
            session,
            hold_id,
            released_at=hold.released_at,
            move_in_seconds=move_in,
            move_out_seconds=sum(moved_out),
        )
    if outcome.oom_failed:
        raise InferenceOOMError(f"out of memory on pages {outcome.oom_failed} even one at a time")
    return {"ok": len(outcome.done), "failed": len(outcome.failed)}
