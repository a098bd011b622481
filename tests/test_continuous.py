"""Continuous batching on the CPU with a tiny real model: same answers and records as static
calls, its cache sized from the call, and out-of-memory errors still answered by static calls."""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor

from vramflow import continuous, models
from vramflow.config import Settings
from vramflow.db.models import Attempt, Result
from vramflow.db.session import session_scope
from vramflow.engine import CallGroup, Engine, EngineParts, PageJob
from vramflow.faults import parse_spec
from vramflow.inference import CallRecord, GenerationSettings, PageInput

TEXTS = ["A short form field.", "A dense paragraph of a paper. " * 20, "Two lines.\nOf text."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return models.load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _no_refusals():
    continuous.forget_refusals()
    yield
    continuous.forget_refusals()


def settings(timeout_s: float = 60.0) -> GenerationSettings:
    return GenerationSettings("Summarise.", "cpu", 3, 128, timeout_s)


def pages() -> list[PageInput]:
    return [PageInput(n, text, key=100 + n) for n, text in enumerate(TEXTS, start=1)]


def run(tiny, injector=None, timeout_s: float = 60.0) -> tuple[object, list[CallRecord]]:
    records: list[CallRecord] = []
    outcome = continuous.run_continuous(
        tiny, pages(), settings(timeout_s), injector=injector, on_call=records.append
    )
    return outcome, records


def summary(records: list[CallRecord]) -> list[tuple[str, str, int]]:
    return [(r.batching, r.outcome, len(r.pages)) for r in records]


def test_continuous_answers_are_the_static_answers(tiny):
    cfg = dict(device="cpu", max_new_tokens=3, max_input_tokens=128, timeout_s=60)
    paged = continuous.generate_continuous(tiny, "Summarise.", TEXTS, **cfg)
    static = models.generate_batch(tiny, "Summarise.", TEXTS, **cfg)
    assert paged == static  # text, tokens in and out, truncation, page by page
    assert tiny.model.config._attn_implementation == "sdpa"  # given back after the call


def test_the_cache_holds_the_call_within_the_grant_and_never_less_than_one_request():
    page = continuous.PAGE_TOKENS
    whole = continuous.cache_plan([100, 30, 300], 28, None)
    assert whole.num_blocks == 2 + 1 + 6  # each request's pages of prompt plus new tokens
    assert whole.max_batch_tokens == whole.num_blocks * page
    assert continuous.cache_plan([100, 30, 300], 28, token_cap=4 * page).num_blocks == 6
    assert continuous.cache_plan([100, 30], 28, token_cap=10_000 * page).num_blocks == 3
    assert continuous.cache_plan([10] * 1000, 54, None).max_batch_tokens == (
        continuous.MAX_STEP_TOKENS
    )


def test_one_continuous_call_answers_every_page_and_is_recorded(tiny):
    outcome, records = run(tiny)
    assert sorted(outcome.done) == [101, 102, 103] and not outcome.failed
    [record] = records
    assert (record.batching, record.outcome, record.device) == ("continuous", "ok", "cpu")
    assert record.rss_bytes and record.torch_max_allocated_bytes is None  # CPU: no GPU figures
    assert all(g.tokens_out == 3 and g.tokens_in > 0 for g in record.generations.values())


def test_an_injected_oom_in_the_continuous_call_still_answers_every_page(tiny):
    outcome, records = run(tiny, injector=parse_spec("above=2"))
    assert sorted(outcome.done) == [101, 102, 103] and not outcome.failed
    assert summary(records) == [
        ("continuous", "oom", 3),
        ("static", "oom", 3),
        ("static", "ok", 1),
        ("static", "ok", 2),
    ]
    assert records[0].retried and not records[0].final_failure
    assert records[0].error_type == "OutOfMemoryError"
    assert continuous.refusal(tiny, "cpu") is None  # memory may be back next call


def fail_steps_with(monkeypatch, error: Exception) -> list[str]:
    """Make every generation step of continuous batching raise `error` (in its own thread)."""
    threads: list[str] = []

    def failing_step(self, model):
        threads.append(threading.current_thread().name)
        raise error

    monkeypatch.setattr(ContinuousBatchProcessor, "_generation_step", failing_step)
    return threads


def test_an_oom_in_the_generation_thread_is_an_oom_and_static_calls_answer(tiny, monkeypatch):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    threads = fail_steps_with(monkeypatch, oom)
    outcome, records = run(tiny)
    assert threads and threading.main_thread().name not in threads
    assert sorted(outcome.done) == [101, 102, 103]
    assert summary(records) == [("continuous", "oom", 3), ("static", "ok", 3)]
    assert records[0].error_type == "OutOfMemoryError" and "out of memory" in (
        records[0].error_message or ""
    )
    assert records[0].retried and continuous.refusal(tiny, "cpu") is None


def test_another_failure_turns_continuous_batching_off_for_the_model(tiny, monkeypatch, caplog):
    fail_steps_with(monkeypatch, ValueError("unsupported cache layout"))
    with caplog.at_level(logging.WARNING, logger="vramflow.continuous"):
        outcome, records = run(tiny)
    assert sorted(outcome.done) == [101, 102, 103]
    assert summary(records) == [("continuous", "error", 3), ("static", "ok", 3)]
    assert "unsupported cache layout" in (continuous.refusal(tiny, "cpu") or "")
    assert continuous.runner(True, tiny, "cpu", None) is None
    assert "continuous batching is off" in caplog.text


def test_a_call_past_its_time_limit_fails_its_pages_as_a_static_call_would(tiny):
    outcome, records = run(tiny, timeout_s=1e-9)
    assert not outcome.done and sorted(outcome.failed) == [101, 102, 103]
    assert summary(records) == [("continuous", "timeout", 3)] and records[0].final_failure


def test_a_model_whose_layers_cannot_take_the_paged_cache_keeps_static_batches(
    tiny, monkeypatch, caplog
):
    monkeypatch.setattr(type(tiny.model), "_supports_attention_backend", False)
    with caplog.at_level(logging.WARNING, logger="vramflow.continuous"):
        assert continuous.runner(True, tiny, "cpu", None) is None
    assert "paged cache" in caplog.text and "static batches instead" in caplog.text
    assert continuous.runner(False, tiny, "cpu", None) is None


class Hold:
    wait_seconds = 0.0


class Recorder:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.lock = threading.Lock()

    def hold_started(self, group, hold_id, hold, device) -> None:
        pass

    def call_finished(self, group, record, jobs, hold_id, slot_wait) -> None:
        with self.lock:
            self.records.append(record)

    def hold_finished(self, group, hold_id, hold, move_in, move_out, pages) -> None:
        pass


def make_engine(tiny, recorder: Recorder, wanted: bool) -> Engine:
    @contextmanager
    def slot(loaded):
        yield Hold()

    parts = EngineParts(
        device="cpu", slot=slot, load=lambda spec: tiny, recorder=recorder, continuous=wanted
    )
    return Engine(parts)


@pytest.mark.parametrize("inject", [None, "above=2"])
def test_the_engine_answers_through_continuous_batching_when_asked(tiny, inject):
    recorder = Recorder()
    eng = make_engine(tiny, recorder, wanted=True)
    group = CallGroup("sqlite://", tiny.spec, "Summarise.", 3, 128, 60.0, inject_oom=inject)
    jobs = [PageJob(page, "run-a") for page in pages()]
    assert eng.submit(group, jobs, batch_size=8).result(timeout=120).ok == [1, 2, 3]
    assert recorder.records[0].batching == "continuous"
    if inject:
        assert summary(recorder.records)[0] == ("continuous", "oom", 3)
        assert recorder.records[-1].outcome == "ok"


def test_the_setting_reaches_the_engine():
    from vramflow.tasks import engine_host

    assert not engine_host.engine_parts(Settings(), "cpu").continuous
    assert engine_host.engine_parts(Settings(continuous_batching=True), "cpu").continuous


def test_the_flow_stores_continuous_answers_and_the_oom_it_met_like_static_ones(
    tmp_path, monkeypatch, prefect_harness, tiny_model_dir
):
    from vramflow.flows.process_pdf import process_pdf

    demo = Path(__file__).resolve().parents[1] / "vramflow" / "demo" / "demo.pdf"
    monkeypatch.setenv("VRAMFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VRAMFLOW_DATABASE_URL", raising=False)
    monkeypatch.setenv("VRAMFLOW_CONTINUOUS_BATCHING", "true")
    monkeypatch.setenv("VRAMFLOW_INJECT_OOM", "above=2")  # room for two pages a call
    params = {"model": str(tiny_model_dir), "max_new_tokens": 3, "batch_size": 4}
    state = asyncio.run(process_pdf(str(demo), pages="1-4", **params, return_state=True))
    assert state.is_completed(), state.message

    with session_scope(f"sqlite:///{tmp_path / 'home' / 'vramflow.db'}") as session:
        results = session.scalars(select(Result).order_by(Result.page_number)).all()
        attempts = session.execute(
            select(Attempt.outcome, Attempt.batch_size, Attempt.device, Attempt.rss_bytes)
            .join(Result, Attempt.result_id == Result.id)
            .where(Result.page_number == 1)
            .order_by(Attempt.id)
        ).all()
    assert [(r.status, r.tokens_out, r.attempts) for r in results] == [("ok", 3, 3)] * 4
    assert all(r.output and r.device == "cpu" and r.tokens_in for r in results)
    # The continuous call of four, the static call of four, then the static half that fitted.
    assert [(a.outcome, a.batch_size) for a in attempts] == [("oom", 4), ("oom", 4), ("ok", 2)]
    assert all(a.device == "cpu" and a.rss_bytes for a in attempts)
