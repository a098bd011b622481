"""The model's device, torch thread and GPU slot during a process-pdf run."""

from __future__ import annotations

import threading
import time

from sqlalchemy import func, select

from tests.support import flow_runs
from tests.support.flow_runs import attempts_of, run
from vramflow.db.models import SlotHold
from vramflow.db.session import session_scope

env = flow_runs.env  # a fresh vramflow home per test


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
    from vramflow import inference
    from vramflow.tasks import engine_host
    from vramflow.tasks import gpu_slot as gpu_slot_module

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
    from vramflow import inference
    from vramflow.tasks import engine_host

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
