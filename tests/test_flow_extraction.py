"""How a process-pdf run feeds the model: pages extracted a few batches ahead, and the
document's extraction time limit."""

from __future__ import annotations

import dataclasses
import threading
import time

from sqlalchemy import select

from tests.support import flow_runs
from tests.support.flow_runs import run
from vramflow.db.models import Page, Result
from vramflow.db.session import session_scope

env = flow_runs.env  # a fresh vramflow home per test


def test_pages_are_extracted_a_few_batches_ahead_of_the_model(env, tiny_model_dir, monkeypatch):
    """A document keeps BATCHES_IN_FLIGHT batches submitted, not every page from the start:
    at batch size 1, page 4 is extracted only after one model call is over."""
    from vramflow import engine, pdf
    from vramflow.flows.process_pdf import BATCHES_IN_FLIGHT

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
