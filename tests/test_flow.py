"""The process-pdf flow under a Prefect test harness, with a tiny model built in the test."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.support.intervals import max_concurrency, stored_call_intervals, stored_hold_intervals
from vramflow.db.models import Attempt, Document, Page, Result, SlotHold
from vramflow.db.session import session_scope

DEMO = Path(__file__).resolve().parents[1] / "vramflow" / "demo" / "demo.pdf"


@pytest.fixture
def env(tmp_path, monkeypatch, prefect_harness):
    """A fresh vramflow home (SQLite database) for each test; fast OOM retries."""
    monkeypatch.setenv("VRAMFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VRAMFLOW_OOM_RETRY_DELAY_SECONDS", "0")
    monkeypatch.setenv("VRAMFLOW_OOM_RETRIES", "1")
    monkeypatch.delenv("VRAMFLOW_INJECT_OOM", raising=False)
    monkeypatch.delenv("VRAMFLOW_DATABASE_URL", raising=False)
    return f"sqlite:///{tmp_path / 'home' / 'vramflow.db'}"


def run_state(model_dir: Path | None, task_workers: int | None = None, **params):
    """The flow's final state over the demo PDF; `task_workers=1` runs its tasks one at a time,
    in order. `model_dir` None leaves the model to VRAMFLOW_MODEL."""
    from prefect.task_runners import ThreadPoolTaskRunner
    from vramflow.flows.process_pdf import process_pdf

    flow = process_pdf
    if task_workers:
        flow = process_pdf.with_options(task_runner=ThreadPoolTaskRunner(task_workers))
    values = {"path": str(DEMO), "max_new_tokens": 3, "batch_size": 4}
    if model_dir is not None:
        values["model"] = str(model_dir)
    return asyncio.run(flow(**{**values, **params}, return_state=True))


def run(model_dir: Path | None, task_workers: int | None = None, **params):
    """The flow's summary; a run with failed pages ends Failed and still carries it."""
    state = run_state(model_dir, task_workers, **params)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), f"{state.name}: {state.message}"
    assert state.is_completed() == (summary["pages_failed"] == 0), state
    return summary


def attempts_of(url: str, page: int) -> list[tuple[str, int]]:
    with session_scope(url) as session:
        rows = session.execute(
            select(Attempt.outcome, Attempt.batch_size)
            .join(Result, Attempt.result_id == Result.id)
            .where(Result.page_number == page)
            .order_by(Attempt.id)
        )
        return [tuple(row) for row in rows]


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


def test_pages_are_extracted_a_few_batches_ahead_of_the_model(env, tiny_model_dir, monkeypatch):
    """A document keeps BATCHES_IN_FLIGHT batches submitted, not every page from the start:
    at batch size 1, page 4 is extracted only after one model call is over."""
    from vramflow.flows.process_pdf import BATCHES_IN_FLIGHT

    from vramflow import engine, pdf

    extracted, inferred = {}, {}
    extract, model_call = pdf.extract_page, engine.run_batch

    def recording_extract(path, page_number, *args, **kwargs):
        extracted[page_number] = time.monotonic()
        return extract(path, page_number, *args, **kwargs)

    def recording_model(loaded, inputs, *args, **kwargs):
        time.sleep(0.3)  # a slow model: time enough for pages further ahead to be extracted
        outcome = model_call(loaded, inputs, *args, **kwargs)
        inferred.update((page.page_number, time.monotonic()) for page in inputs)
        return outcome

    monkeypatch.setattr(pdf, "extract_page", recording_extract)
    monkeypatch.setattr(engine, "run_batch", recording_model)
    summary = run(tiny_model_dir, batch_size=1)
    assert summary["pages_ok"] == 6 and BATCHES_IN_FLIGHT < 6
    finished = sorted(inferred.values())
    for page in range(BATCHES_IN_FLIGHT + 1, 7):
        assert extracted[page] > finished[page - BATCHES_IN_FLIGHT - 1], page


def test_a_batch_that_finishes_first_is_replaced_at_once(env, tiny_model_dir, monkeypatch):
    """Page 1's extraction holds until page 4 has been through the model: only possible if
    the flow submits page 4 when page 2 or 3 is done, not when the oldest batch is."""
    from vramflow import engine, pdf

    page_4_inferred = threading.Event()
    extract, model_call, held_back = pdf.extract_page, engine.run_batch, []

    def extract_page_1_last(path, page_number, *args, **kwargs):
        if page_number == 1:
            held_back.append(page_4_inferred.wait(timeout=30))
        return extract(path, page_number, *args, **kwargs)

    def noting_page_4(loaded, inputs, *args, **kwargs):
        outcome = model_call(loaded, inputs, *args, **kwargs)
        if any(page.page_number == 4 for page in inputs):
            page_4_inferred.set()
        return outcome

    monkeypatch.setattr(pdf, "extract_page", extract_page_1_last)
    monkeypatch.setattr(engine, "run_batch", noting_page_4)
    summary = run(tiny_model_dir, batch_size=1)
    assert summary["pages_ok"] == 6
    assert held_back == [True]


def test_pages_waiting_for_the_model_keep_their_extraction_time(env, tiny_model_dir, monkeypatch):
    """The document's extraction time limit counts extracting, not waiting: with one task
    thread, page 6 is extracted only after five model calls, long after the limit here."""
    from vramflow import engine

    monkeypatch.setenv("VRAMFLOW_DOCUMENT_TIMEOUT_SECONDS", "2")
    model_call = engine.run_batch

    def slow_model(*args, **kwargs):
        time.sleep(0.6)  # a model slower, over the document, than its extraction limit
        return model_call(*args, **kwargs)

    monkeypatch.setattr(engine, "run_batch", slow_model)
    summary = run(tiny_model_dir, task_workers=1, batch_size=1)
    assert summary["status"] == "done" and summary["pages_ok"] == 6, summary["errors"]


def test_pages_after_the_extraction_time_limit_fail_alone(env, tiny_model_dir, monkeypatch):
    """Every page takes 4 s to extract (as its worker reports it) against a limit of 10 s:
    pages 1-3 start within the limit, 4-6 fail with a stored reason and are not inferred."""
    from vramflow import pdf

    monkeypatch.setenv("VRAMFLOW_DOCUMENT_TIMEOUT_SECONDS", "10")
    extract = pdf.extract_page

    def slow_pages(*args, **kwargs):
        return dataclasses.replace(extract(*args, **kwargs), extract_seconds=4.0)

    monkeypatch.setattr(pdf, "extract_page", slow_pages)
    summary = run(tiny_model_dir, task_workers=1, batch_size=1)
    assert summary["status"] == "partial" and summary["pages_ok"] == 3
    with session_scope(env) as session:
        pages = {p.page_number: p for p in session.scalars(select(Page))}
        inferred = set(session.scalars(select(Result.page_number)))
    assert [pages[n].status for n in range(1, 7)] == ["ok"] * 3 + ["failed"] * 3
    assert all(pages[n].error_type == "LimitExceededError" for n in (4, 5, 6))
    assert "extraction time limit (10 s) was reached" in pages[6].error_message
    assert inferred == {1, 2, 3}


def test_device_memory_is_handed_back_only_with_the_weights(env, tiny_model_dir, monkeypatch):
    """Between batches that keep the slot (and the weights) in this process nothing is freed: a
    garbage collection and `empty_cache` per batch cost a GPU hundreds of ms per page at batch 1.
    Whenever the weights leave the device, its cached memory goes back right after them."""
    from vramflow import gpu, models

    events: list[str] = []
    move, free = models.move_model, gpu.free_memory

    def recorded_move(loaded, device):
        events.append(f"move {device}")
        return move(loaded, device)

    def recorded_free(device):
        events.append("free")
        free(device)

    monkeypatch.setattr(models, "move_model", recorded_move)
    monkeypatch.setattr(gpu, "free_memory", recorded_free)
    summary = run(tiny_model_dir, batch_size=1)
    assert summary["pages_ok"] == 6
    with session_scope(env) as session:
        holds = session.scalar(select(func.count(SlotHold.id)))
    moves_off = len([e for e in events if e.startswith("move")]) - holds  # one move in per hold
    assert moves_off >= 1 and events[-2:] == ["move cpu", "free"]
    assert events.count("free") == moves_off
    assert all(events[i - 1].startswith("move") for i, e in enumerate(events) if e == "free")


def test_every_torch_call_of_the_flow_runs_on_one_thread(env, tiny_model_dir, monkeypatch):
    """Batches run in different task-runner threads, but loading, moving and generating all
    happen on the process's torch thread: a second calling thread would slow torch down."""
    import threading

    from vramflow import inference, models

    threads: dict[str, set[int]] = {"load": set(), "move": set(), "generate": set()}

    def recorded(kind, fn):
        def call(*args, **kwargs):
            threads[kind].add(threading.get_ident())
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(models, "_cache", {})  # loaded by this flow, not by an earlier test
    monkeypatch.setattr(models, "load_model", recorded("load", models.load_model))
    monkeypatch.setattr(models, "move_model", recorded("move", models.move_model))
    monkeypatch.setattr(inference, "generate_batch", recorded("generate", models.generate_batch))
    summary = run(tiny_model_dir, batch_size=1)
    assert summary["pages_ok"] == 6
    used = set().union(*threads.values())
    assert all(threads.values()) and len(used) == 1
    assert used != {threading.get_ident()}


def test_the_next_batch_waits_in_the_engine_while_one_generates(env, tiny_model_dir, monkeypatch):
    """The engine keeps the slot only while pages wait: each of the first three calls of four
    pages one by one must find the next page queued, and the slot is taken from the server once."""
    from vramflow.tasks import engine_host
    from vramflow.tasks import gpu_slot as gpu_slot_module

    from vramflow import inference

    generate, acquire = inference.generate_batch, gpu_slot_module._acquire
    in_line_seen, from_server = [], []

    def waiting_in_the_engine() -> int:
        return sum(engine.pages_waiting for engine in engine_host._engines.values())

    def generate_after_a_look(*args, **kwargs):
        if len(in_line_seen) < 3:
            deadline = time.monotonic() + 10
            while not waiting_in_the_engine() and time.monotonic() < deadline:
                time.sleep(0.005)
            in_line_seen.append(waiting_in_the_engine() > 0)
        return generate(*args, **kwargs)

    def counted_acquire(*args, **kwargs):
        from_server.append(args[0])
        return acquire(*args, **kwargs)

    monkeypatch.setattr(inference, "generate_batch", generate_after_a_look)
    monkeypatch.setattr(gpu_slot_module, "_acquire", counted_acquire)
    summary = run(tiny_model_dir, batch_size=1, pages="1-4")
    assert summary["pages_ok"] == 4
    assert in_line_seen == [True, True, True]
    assert len(from_server) == 1  # one hold for the four calls


def test_the_slot_passes_on_while_the_answers_are_stored(env, tiny_model_dir, monkeypatch):
    """A holder that wrote its answers itself kept the slot for that commit, 3-5 ms of every
    hand-off. The first batch's answers are held back here until the second batch generates."""
    from vramflow.tasks import engine_host

    from vramflow import inference

    generate, store = inference.generate_batch, engine_host.store_call
    second_generates, stored_after_it = threading.Event(), []

    def generate_counted(*args, **kwargs):
        if generate_counted.calls == 1:
            second_generates.set()
        generate_counted.calls += 1
        return generate(*args, **kwargs)

    def store_held_back(*args, **kwargs):
        if not stored_after_it:
            stored_after_it.append(second_generates.wait(timeout=20))
        return store(*args, **kwargs)

    generate_counted.calls = 0
    monkeypatch.setattr(inference, "generate_batch", generate_counted)
    monkeypatch.setattr(engine_host, "store_call", store_held_back)
    summary = run(tiny_model_dir, batch_size=1, pages="1-2")
    assert summary["pages_ok"] == 2
    assert stored_after_it == [True]
    assert attempts_of(env, 1) == [("ok", 1)]


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


@pytest.mark.parametrize("documents_at_once", [1, 2])
def test_process_documents_runs_at_most_documents_at_once_together(
    prefect_harness, monkeypatch, documents_at_once
):
    """A plain coroutine stands in for process-pdf here: whether real subflows overlap also
    depends on how fast the server creates their runs, and this is about how many the sweep
    lets run."""
    import threading

    from prefect import flow
    from prefect.states import Completed
    from vramflow.flows import many_documents

    lock, running, most = threading.Lock(), [0], [0]
    together = threading.Barrier(documents_at_once, timeout=60)

    async def stand_in(path: str, return_state: bool) -> Completed:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        together.wait()  # with 2 at once, passes only when two documents are running
        with lock:
            running[0] -= 1
        return Completed(data={"status": "done", "pages_ok": 1, "pages_failed": 0})

    @flow
    def sweep_of_stand_ins() -> list:
        jobs = [many_documents.DocumentJob(f"{n}.pdf", {"path": f"{n}.pdf"}) for n in range(4)]
        return many_documents.process_documents(jobs, documents_at_once)

    monkeypatch.setattr(many_documents, "process_pdf", stand_in)
    outcomes = sweep_of_stand_ins()
    assert [(o.file, o.outcome) for o in outcomes] == [(f"{n}.pdf", "processed") for n in range(4)]
    assert most[0] == documents_at_once


def test_sweep_runs_documents_side_by_side_and_the_model_one_batch_at_a_time(
    env, tiny_model_dir, tmp_path
):
    from vramflow.flows.sweep_inbox import sweep_inbox

    from vramflow.demo.pdfgen import write_text_pdf

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a-demo.pdf").write_bytes(DEMO.read_bytes())
    write_text_pdf(inbox / "b-notes.pdf", [f"Note {n}: the pump was serviced." for n in range(5)])
    (inbox / "c-broken.pdf").write_bytes(b"%PDF-1.7\nnot really a PDF")
    summary = sweep_inbox(
        inbox=str(inbox),
        model=str(tiny_model_dir),
        max_new_tokens=3,
        batch_size=2,
        documents_at_once=2,
    )
    assert summary["processed"] == ["a-demo.pdf", "b-notes.pdf"]
    assert summary["failed"] == ["c-broken.pdf"]
    [broken] = [o for o in summary["outcomes"] if o["file"] == "c-broken.pdf"]
    assert "not a readable PDF" in broken["detail"]
    with session_scope(env) as session:
        pages = session.execute(select(Result.status, func.count()).group_by(Result.status)).all()
    assert dict(pages) == {"ok": 11}
    calls = stored_call_intervals(env)
    assert list(calls) == ["cpu"] and max_concurrency(calls["cpu"]) == 1
    assert max_concurrency(stored_hold_intervals(env)) == 1


def test_slot_wait_counts_only_waiting_for_the_device_not_the_runs_own_queue(
    env, tiny_model_dir, monkeypatch
):
    """Six batches of one page, each call 0.3 s: every batch but the first waits behind the
    run's own earlier batches (about 1.5 s in all), which is queueing, not waiting for another
    holder of the device; a solo run takes the slot once."""
    from vramflow import engine

    model_call = engine.run_batch

    def slow_model(*args, **kwargs):
        time.sleep(0.3)  # a slower model, so that batches queue behind each other
        return model_call(*args, **kwargs)

    monkeypatch.setattr(engine, "run_batch", slow_model)
    summary = run(tiny_model_dir, batch_size=1)
    assert summary["pages_ok"] == 6 and summary["slot_holds"] == 1
    assert summary["slot_wait_seconds"] < 1.0
