"""Turn model-call records into attempt and result rows (shared by the inference task)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from vramflow.db import queries
from vramflow.inference import CallRecord


def attempt_rows(
    record: CallRecord, result_ids: dict[int, int], hold_id: str, runs: dict[int, str | None]
) -> list[dict]:
    """One attempt row per page of the call: the batch size shows how it was split, the call id
    which pages (of which documents) shared it."""
    rows = []
    for page in record.pages:
        generation = record.generations.get(page)
        rows.append(
            {
                "result_id": result_ids[page],
                "hold_id": hold_id,
                "call_id": record.call_id,
                "flow_run_id": runs.get(page),
                "outcome": record.outcome,
                "error_message": record.error_message,
                "device": record.device,
                "batch_size": len(record.pages),
                "started_at": record.started_at,
                "finished_at": record.finished_at,
                "infer_seconds": record.infer_seconds,
                "tokens_in": generation.tokens_in if generation else None,
                "tokens_out": generation.tokens_out if generation else None,
                "torch_max_allocated_bytes": record.torch_max_allocated_bytes,
                "torch_max_reserved_bytes": record.torch_max_reserved_bytes,
                "nvml_used_before_bytes": record.before.used_bytes,
                "nvml_free_before_bytes": record.before.free_bytes,
                "nvml_used_after_bytes": record.after.used_bytes,
                "nvml_free_after_bytes": record.after.free_bytes,
                "nvml_total_bytes": record.before.total_bytes or record.after.total_bytes,
                "rss_bytes": record.rss_bytes,
            }
        )
    return rows


def store_call(
    session: Session,
    record: CallRecord,
    result_ids: dict[int, int],
    hold_id: str,
    slot_wait: float,
    runs: dict[int, str | None],
) -> None:
    """Write a call's attempts, and the results it settles: its answers, or a final failure.

    `runs` gives each page's flow run. An out-of-memory call over several pages is not final:
    the batch is split and retried; nor is a call whose pages went on to another call.
    """
    queries.record_attempts(session, attempt_rows(record, result_ids, hold_id, runs))
    timing = {
        "device": record.device,
        "infer_started_at": record.started_at,
        "infer_finished_at": record.finished_at,
        "infer_seconds": record.infer_seconds,
        "slot_wait_seconds": slot_wait,
        "worker_id": None,
    }
    if record.outcome == "ok":
        for page, generation in record.generations.items():
            queries.finish_result(
                session,
                result_ids[page],
                flow_run_id=runs.get(page),
                status="ok",
                output=generation.text,
                tokens_in=generation.tokens_in,
                tokens_out=generation.tokens_out,
                input_truncated=generation.input_truncated,
                error_type=None,
                error_message=None,
                peak_vram_bytes=record.torch_max_allocated_bytes,
                **timing,
            )
    elif record.final_failure:
        for page in record.pages:
            queries.finish_result(
                session,
                result_ids[page],
                flow_run_id=runs.get(page),
                status="failed",
                output=None,
                error_type=record.error_type,
                error_message=record.error_message,
                **timing,
            )
