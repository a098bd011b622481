"""The engine without Prefect: pages of different requests share model calls, per group."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pytest

from vramflow import models
from vramflow.engine import CallGroup, Engine, EngineParts, PageJob
from vramflow.errors import ModelError, SlotError
from vramflow.inference import PageInput


@dataclass
class Hold:
    wait_seconds: float = 0.0
    acquired_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    released_at: datetime | None = None


class Gate:
    """A slot that lets holders in only once opened, one at a time, counting holds."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.holds = 0
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, loaded=None):
        self.opened.wait()
        with self._lock:
            self.holds += 1
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        hold = Hold()
        try:
            yield hold
        finally:
            hold.released_at = datetime.now(timezone.utc)
            with self._lock:
                self.inside -= 1


class Calls:
    """A recorder that keeps each model call's outcome and the requests' pages it carried."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, int]]]] = []
        self.hold_over = threading.Event()

    def hold_started(self, group, hold_id, hold, device) -> None:
        pass

    def call_finished(self, group, record, jobs, hold_id, slot_wait) -> None:
        carried = [(jobs[key].flow_run_id, jobs[key].page.page_number) for key in record.pages]
        self.calls.append((record.outcome, carried))

    def hold_finished(self, group, hold_id, hold, move_in, move_out, pages) -> None:
        self.hold_over.set()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return models.load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


def group(tiny, **changes) -> CallGroup:
    values = dict(
        database_url="sqlite://",
        model=tiny.spec,
        prompt="Summarise.",
        max_new_tokens=2,
        max_input_tokens=128,
        timeout_s=60.0,
    )
    return CallGroup(**{**values, **changes})


def jobs(run: str, pages: list[int], first_key: int) -> list[PageJob]:
    return [
        PageJob(PageInput(page, f"{run} page {page} text.", key=first_key + i), run)
        for i, page in enumerate(pages)
    ]


def engine(tiny, gate: Gate, calls: Calls, loads: list[str] | None = None) -> Engine:
    def load(spec: str):
        if loads is not None:
            loads.append(spec)
        if spec != tiny.spec:
            raise OSError(f"{spec} is not a folder, and the hub cannot be reached (offline)")
        return tiny

    return Engine(EngineParts(device="cpu", slot=gate.slot, load=load, recorder=calls))


def test_pages_of_different_runs_share_a_call_up_to_the_batch_size(tiny):
    gate, calls = Gate(), Calls()
    eng = engine(tiny, gate, calls)
    first = eng.submit(group(tiny), jobs("run-a", [1, 2], 100), batch_size=4)
    second = eng.submit(group(tiny), jobs("run-b", [1, 2, 3], 200), batch_size=4)
    gate.opened.set()
    a, b = first.result(timeout=60), second.result(timeout=60)
    assert (a.ok, b.ok) == ([1, 2], [1, 2, 3])
    assert [carried for _, carried in calls.calls] == [
        [("run-a", 1), ("run-a", 2), ("run-b", 1), ("run-b", 2)],
        [("run-b", 3)],
    ]
    assert gate.holds == 1  # the slot stayed while pages waited


def test_different_prompts_never_share_a_call(tiny):
    gate, calls = Gate(), Calls()
    eng = engine(tiny, gate, calls)
    first = eng.submit(group(tiny), jobs("run-a", [1], 100), batch_size=8)
    other = eng.submit(group(tiny, prompt="Translate."), jobs("run-b", [1], 200), batch_size=8)
    gate.opened.set()
    first.result(timeout=60), other.result(timeout=60)
    assert sorted(carried for _, carried in calls.calls) == [[("run-a", 1)], [("run-b", 1)]]
    assert gate.most_inside == 1


def test_an_oom_splits_a_call_of_two_runs_and_every_page_is_answered(tiny):
    gate, calls = Gate(), Calls()
    eng = engine(tiny, gate, calls)
    oom = group(tiny, inject_oom="above=2")
    first = eng.submit(oom, jobs("run-a", [1, 2], 100), batch_size=4)
    second = eng.submit(oom, jobs("run-b", [7, 8], 200), batch_size=4)
    gate.opened.set()
    assert first.result(timeout=60).ok == [1, 2] and second.result(timeout=60).ok == [7, 8]
    outcomes = [(outcome, len(carried)) for outcome, carried in calls.calls]
    assert outcomes == [("oom", 4), ("ok", 2), ("ok", 2)]


def test_a_model_that_cannot_load_fails_its_requests_once_and_fast(tiny):
    gate, calls, loads = Gate(), Calls(), []
    eng = engine(tiny, gate, calls, loads)
    missing = group(tiny, model="Qwen/Qwen2.5-1.5B-Instruct")
    waiting = [eng.submit(missing, jobs(f"run-{i}", [1], 100 * i), batch_size=4) for i in (1, 2)]
    gate.opened.set()
    for future in waiting:
        with pytest.raises(ModelError, match="cannot load model Qwen/Qwen2.5-1.5B-Instruct.*"):
            future.result(timeout=60)
    later = eng.submit(missing, jobs("run-3", [1], 300), batch_size=4)
    with pytest.raises(ModelError, match="offline"):
        later.result(timeout=60)
    assert loads == ["Qwen/Qwen2.5-1.5B-Instruct"]  # tried once, not per request
    assert calls.calls == [] and gate.holds == 0  # the device was never taken for it
    ok = eng.submit(group(tiny), jobs("run-4", [1], 400), batch_size=4)
    assert ok.result(timeout=60).ok == [1]


def test_the_slot_goes_back_when_no_page_waits(tiny):
    gate, calls = Gate(), Calls()
    gate.opened.set()
    eng = engine(tiny, gate, calls)
    eng.submit(group(tiny), jobs("run-a", [1], 100), batch_size=4).result(timeout=60)
    assert calls.hold_over.wait(timeout=60)  # released once nothing waited
    calls.hold_over.clear()
    eng.submit(group(tiny), jobs("run-b", [1], 200), batch_size=4).result(timeout=60)
    assert calls.hold_over.wait(timeout=60)
    assert gate.holds == 2 and gate.inside == 0
    assert eng.pages_waiting == 0


class Cancelled(BaseException):
    """What a lost lease raises in its holder (a cancellation, not an Exception)."""


def test_a_call_broken_off_fails_its_requests_and_the_engine_goes_on(tiny, monkeypatch):
    from vramflow import engine as engine_module

    gate, calls = Gate(), Calls()
    gate.opened.set()
    eng = engine(tiny, gate, calls)
    run_batch = engine_module.run_batch

    def lease_lost(*args, **kwargs):
        raise Cancelled("the slot's lease was lost")

    monkeypatch.setattr(engine_module, "run_batch", lease_lost)
    broken = eng.submit(group(tiny), jobs("run-a", [1, 2], 100), batch_size=4)
    with pytest.raises(SlotError, match="lease was lost"):
        broken.result(timeout=60)
    monkeypatch.setattr(engine_module, "run_batch", run_batch)
    assert eng.submit(group(tiny), jobs("run-b", [1], 200), batch_size=4).result(60).ok == [1]
    assert calls.hold_over.wait(timeout=60) and gate.holds == 2 and gate.inside == 0


def test_a_token_budget_gives_short_and_long_pages_calls_of_their_own(tiny):
    gate, calls = Gate(), Calls()
    eng = engine(tiny, gate, calls)
    short, long = "A short form field.", "A dense paragraph of a paper. " * 60
    texts = [short, long, short, long, short, short]
    pages = [PageJob(PageInput(n, text, key=100 + n), "run-a") for n, text in enumerate(texts, 1)]
    request = eng.submit(group(tiny, max_input_tokens=512), pages, batch_size=8, token_budget=1200)
    gate.opened.set()
    assert request.result(timeout=120).ok == [1, 2, 3, 4, 5, 6]
    carried = [sorted(page for _, page in pages_of_call) for _, pages_of_call in calls.calls]
    assert carried == [[1, 3, 5, 6], [2, 4]]  # the long pages are never padded into the short
