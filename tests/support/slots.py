"""Helpers for tests of the GPU slot against a real Prefect server."""

from __future__ import annotations

import contextvars
import threading
import time
import uuid
from collections.abc import Callable

from prefect.client.orchestration import get_client


def unique_name(label: str) -> str:
    return f"vramflow-test-{label}-{uuid.uuid4().hex[:8]}"


def read_limit(name: str):
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def in_threads(count: int, target: Callable[[], None], timeout: float = 120) -> None:
    """Run `target` in `count` threads (each with a copy of this context); re-raise a failure."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(run,)) for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "a worker thread is stuck"
    if errors:
        raise errors[0]
