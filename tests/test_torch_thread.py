"""vramflow.torch_thread: every call runs on one thread, whoever calls, and fails as it would."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from vramflow import torch_thread


def test_calls_from_many_threads_run_on_one_thread_in_turn():
    running = 0
    most_at_once = 0
    lock = threading.Lock()

    def work(n: int) -> tuple[int, int]:
        nonlocal running, most_at_once
        with lock:
            running += 1
            most_at_once = max(most_at_once, running)
        torch.ones(64, 64) @ torch.ones(64, 64)  # a parallel torch op, as generation makes
        with lock:
            running -= 1
        return n, threading.get_ident()

    with ThreadPoolExecutor(max_workers=6) as callers:
        results = list(callers.map(lambda n: torch_thread.run(work, n), range(24)))
    assert [n for n, _ in results] == list(range(24))
    assert len({ident for _, ident in results}) == 1
    assert results[0][1] != threading.get_ident() and most_at_once == 1


def test_an_error_reaches_the_caller_with_its_own_type():
    def run_out() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        torch_thread.run(run_out)
    assert torch_thread.run(lambda: 7) == 7  # the thread survives its callers' errors


def test_a_call_made_on_the_torch_thread_runs_in_place():
    def outer() -> tuple[bool, int, int]:
        inner = torch_thread.run(threading.get_ident)  # would deadlock if it queued
        return torch_thread.is_torch_thread(), threading.get_ident(), inner

    on_thread, outer_id, inner_id = torch_thread.run(outer)
    assert on_thread and outer_id == inner_id
    assert not torch_thread.is_torch_thread()


def test_a_forked_child_gets_a_torch_thread_of_its_own():
    import multiprocessing

    torch_thread.run(lambda: None)  # the parent's thread exists before the fork
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        answer = pool.apply_async(_in_child).get(timeout=60)
    assert answer == 3


def _in_child() -> int:
    return torch_thread.run(lambda: 1 + 2)
