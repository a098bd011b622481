"""Helpers for tests of the GPU slot against a real Prefect server."""

from __future__ import annotations

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
