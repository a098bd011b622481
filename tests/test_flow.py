"""The process-pdf flow under a Prefect test harness, with a tiny model built in the test: what
it stores per page and document, and how a page that runs out of memory is split and retried."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tests.support import flow_runs
from tests.support.flow_runs import attempts_of, run, run_state
from vramflow.db.models import Attempt, Document, Page, Result, SlotHold
from vramflow.db.session import session_scope

env = flow_runs.env  # a fresh vramflow home per test


def test_flow_stores_one_result_per_page_and_a_rerun_does_nothing(env, tiny_model_dir):
    summary = run(tiny_model_dir)
    assert summary["status"] == "done" and summary["pages_ok"] == 6
    with session_scope(env) as session:
        results = session.scalars(select(Result).order_by(Result.page_number)).all()
        assert [r.page_number for r in results] == [1, 2, 3, 4, 5, 6]
        assert all(r.status == "ok" and r.output is not None for r in results)
        assert all(r.tokens_in > 0 and 0 < r.tokens_out <= 3 for r in results)
        assert all(r.device == "cpu" and r.peak_vram_bytes is None for r in results)
        assert {r.flow_run_id for r in results} == {summary["flow_run_id"]}
        assert all(r.infer_started_at <= r.infer_finished_at for r in results)
        # Both batches in one hold: the engine keeps the slot while pages wait for it.
        [hold] = session.scalars(select(SlotHold)).all()
        assert hold.released_at is not None and hold.move_in_seconds is not None
        assert (hold.pages, hold.flow_run_id) == (6, summary["flow_run_id"])
        attempts_before = session.scalar(select(func.count(Attempt.id)))
    again = run(tiny_model_dir)
    assert again["pages_already_done"] == 6 and again["pages_inferred"] == 0
    with session_scope(env) as session:
        assert session.scalar(select(func.count(Attempt.id))) == attempts_before
        assert session.scalar(select(func.count(Result.id))) == 6
    forced = run(tiny_model_dir, force=True, pages="2")
    assert forced["pages_inferred"] == 1
    with session_scope(env) as session:
        assert session.scalar(select(func.count(Result.id))) == 6  # updated in place


def test_every_task_run_of_a_document_shares_the_flows_api_client(env, tiny_model_dir, monkeypatch):
    """An async flow's task runs build a Prefect client each unless the flow leaves one in
    their context; building them delayed the first extraction (see flows/process_pdf.py)."""
    from prefect.context import SyncClientContext

    from vramflow import pdf

    seen, extract = [], pdf.extract_page

    def recording(*args, **kwargs):
        seen.append(SyncClientContext.get())
        return extract(*args, **kwargs)

    monkeypatch.setattr(pdf, "extract_page", recording)
    summary = run(tiny_model_dir)
    assert summary["pages_ok"] == 6 and len(seen) == 6
    assert seen[0] is not None and all(context is seen[0] for context in seen)


def test_injected_oom_twice_splits_and_the_page_succeeds(env, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VRAMFLOW_INJECT_OOM", "page=3,times=2")
    summary = run(tiny_model_dir, pages="1-4")
    assert summary["status"] == "done" and summary["pages_ok"] == 4
    assert attempts_of(env, 3) == [("oom", 4), ("oom", 2), ("ok", 1)]
    assert attempts_of(env, 1) == [("oom", 4), ("ok", 2)]
    assert summary["oom_attempts"] == 2


def test_a_later_batch_starts_at_the_size_that_fitted(env, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VRAMFLOW_INJECT_OOM", "above=1")  # room for one page per call
    first = run(tiny_model_dir, batch_size=4, pages="1-4")
    assert first["status"] == "done" and first["pages_ok"] == 4
    assert attempts_of(env, 1) == [("oom", 4), ("oom", 2), ("ok", 1)]
    # A later run of this process starts its batch of two one page at a time, with no failed
    # call first.
    second = run(tiny_model_dir, batch_size=2, pages="5-6")
    assert second["pages_inferred"] == 2 and second["oom_attempts"] == 0
    assert attempts_of(env, 5) == [("ok", 1)] and attempts_of(env, 6) == [("ok", 1)]


def test_oom_every_time_fails_that_page_only(env, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VRAMFLOW_INJECT_OOM", "page=2,times=all")
    summary = run(tiny_model_dir)
    assert summary["status"] == "partial"
    with session_scope(env) as session:
        results = {r.page_number: r for r in session.scalars(select(Result))}
        document = session.scalars(select(Document)).one()
    assert document.status == "partial"
    assert results[2].status == "failed" and "out of memory" in results[2].error_message
    assert all(results[p].status == "ok" for p in (1, 3, 4, 5, 6))
    # In the slot: 4 → 2 → 1 pages; then one Prefect task retry (VRAMFLOW_OOM_RETRIES=1).
    assert attempts_of(env, 2) == [("oom", 4), ("oom", 2), ("oom", 1), ("oom", 1)]
    assert results[2].attempts == 4


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"<html>not a pdf</html>", "not a PDF")],
)
def test_bad_file_fails_its_document_with_a_stored_message(
    env, tiny_model_dir, tmp_path, content, message
):
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(content)
    state = run_state(tiny_model_dir, path=str(bad))
    assert state.is_failed() and message in state.message
    with session_scope(env) as session:
        document = session.scalars(select(Document)).one()
    assert document.status == "failed" and message in document.error_message
    summary = run(tiny_model_dir, pages="1")  # the next document is unaffected
    assert summary["status"] == "done" and summary["pages_ok"] == 1


def test_pages_without_text_skip_inference(env, tiny_model_dir, tmp_path):
    from vramflow.demo.pdfgen import write_text_pdf

    pdf = write_text_pdf(tmp_path / "mixed.pdf", ["Some words here.", "", "More words."])
    summary = run(tiny_model_dir, path=str(pdf))
    assert summary["pages_ok"] == 2 and summary["pages_no_text"] == 1
    with session_scope(env) as session:
        statuses = dict(session.execute(select(Page.page_number, Page.status)).all())
        assert statuses == {1: "ok", 2: "no_text", 3: "ok"}
        assert session.scalar(select(func.count(Result.id))) == 2


@pytest.mark.parametrize(("every_seconds", "shown"), [(0, 6), (3600, 1)])
def test_the_progress_artifact_is_updated_at_most_every_so_often_and_at_the_end(
    env, tiny_model_dir, monkeypatch, every_seconds, shown
):
    from vramflow.tasks import report

    updates: list[float] = []
    update = report.aupdate_progress_artifact

    async def recorded(artifact_id, progress):
        updates.append(progress)
        return await update(artifact_id, progress=progress)

    monkeypatch.setattr(report, "UPDATE_EVERY_SECONDS", every_seconds)
    monkeypatch.setattr(report, "aupdate_progress_artifact", recorded)
    summary = run(tiny_model_dir, batch_size=1)
    assert summary["pages_ok"] == 6
    assert len(updates) == shown and updates[-1] == 100.0
    assert updates == sorted(updates)


def test_the_flow_loads_the_weights_in_the_configured_dtype(env, tiny_model_dir, monkeypatch):
    import torch

    from vramflow import models

    asked: list[torch.dtype] = []
    load = models.load_model

    def recorded_load(spec, cache_dir, dtype=torch.float32):
        asked.append(dtype)
        return load(spec, cache_dir, dtype)

    monkeypatch.setattr(models, "_cache", {})  # loaded by this flow, not by an earlier test
    monkeypatch.setattr(models, "load_model", recorded_load)
    monkeypatch.setenv("VRAMFLOW_DTYPE", "bfloat16")
    summary = run(tiny_model_dir, pages="1-2")
    assert summary["pages_ok"] == 2
    assert asked and set(asked) == {torch.bfloat16}
