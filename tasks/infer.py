"""Prefect task: answer a batch of pages of one document through this process's engine.

The task runs where the model lives: in a `vramflow gpu-worker` (submitted with `.delay()` and
served by a Prefect task worker), or in the flow's own process for the embedded default
(`.submit()`). Either way it claims its pages, hands them to the engine (which merges them with
other runs' pages into model calls inside the GPU slot), and waits for their answers. Torch is
imported only when the task runs, so a flow process that sends its batches to a GPU worker
never loads it.
"""

from __future__ import annotations

import threading

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from vramflow.config import Settings
from vramflow.db import queries
from vramflow.db.session import session_scope
from vramflow.errors import InferenceOOMError, ModelError, SlotError
from vramflow.runs import generation_settings_json, key_parts

# Held for good by `stop_claims` once `vramflow run` is interrupted: from then on no batch of
# this process marks a page `running`, so the statuses written for the interruption stay true.
_claims = threading.Lock()


def stop_claims() -> None:
    """Let no batch of this process claim pages any more (the process is about to exit)."""
    _claims.acquire()


def retry_only_oom(task, task_run, state) -> bool:
    """Prefect retries the task only when it failed with an out-of-memory error."""
    try:
        state.result()
    except InferenceOOMError:
        return True
    except Exception:
        return False
    return False


def _claim_pages(
    document_id: int,
    pages: list[int],
    settings: Settings,
    force: bool,
    run_id: str | None,
    worker_id: str | None,
) -> list[tuple[int, int, str]]:
    """(page, result id, text) of this batch's pages still to do, now claimed: not done already
    (with `force`: not done by this run, so a retry does not redo what its first try did)."""
    key = queries.ResultKey(document_id, *key_parts(settings))
    with session_scope(settings.resolved_database_url) as session:
        done = queries.done_pages(session, key, only_run=run_id if force else None)
        todo = [p for p in pages if p not in done]
        texts = queries.page_texts(session, document_id, todo)
        wanted = {"ok"} if settings.skip_no_text else {"ok", "no_text"}
        todo = [p for p in todo if p in texts and texts[p].status in wanted]
        ids = queries.start_results(
            session,
            key,
            todo,
            settings.prompt,
            generation_settings_json(settings),
            run_id,
            worker_id,
        )
    return [(p, ids[p], texts[p].text) for p in todo]


def _fail_claimed(settings: Settings, document_id: int, pages: list[int], exc: Exception) -> None:
    key = queries.ResultKey(document_id, *key_parts(settings))
    with session_scope(settings.resolved_database_url) as session:
        queries.fail_results(
            session,
            key,
            pages,
            settings.prompt,
            generation_settings_json(settings),
            flow_run.id,
            type(exc).__name__,
            str(exc),
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
    """Generate answers for `pages` of document `document_id` with the model, prompt and
    generation settings of `settings`; stores them, and returns the counts ok and failed."""
    from vramflow.engine import PageJob
    from vramflow.inference import PageInput
    from vramflow.tasks import engine_host  # torch, on first use

    logger, run_id = get_run_logger(), flow_run.id
    with _claims:
        claimed = _claim_pages(document_id, pages, settings, force, run_id, engine_host.worker_id())
    if not claimed:
        return {"ok": 0, "failed": 0}
    jobs = [
        PageJob(PageInput(page, text, key=result_id), run_id) for page, result_id, text in claimed
    ]
    engine = engine_host.engine_for(settings)
    try:
        outcome = engine.submit(
            engine_host.call_group(settings), jobs, settings.batch_size, settings.max_batch_tokens
        ).result()
    except (ModelError, SlotError) as exc:
        _fail_claimed(settings, document_id, [page for page, _, _ in claimed], exc)
        logger.error("pages %s failed: %s", pages, exc)
        return {"ok": 0, "failed": len(claimed)}
    # One line per batch: every log line is a request to the Prefect API and a database write.
    logger.info(
        "pages %s: %d ok, %d failed (queued %.2f s, of it %.2f s waiting for the device)",
        pages,
        len(outcome.ok),
        len(outcome.failed),
        outcome.queued_seconds,
        outcome.slot_wait_seconds,
    )
    if outcome.oom_failed:
        raise InferenceOOMError(f"out of memory on pages {outcome.oom_failed} even one at a time")
    return {"ok": len(outcome.ok), "failed": len(outcome.failed)}
