"""Every use of Prefect's private API in vramflow, in one place (tests/test_prefect_private.py
fails when a Prefect upgrade changes one of them).

- `cancel_scope` / `CancelledError`: Prefect's thread cancel scope, which throws into a thread
  from another one. Prefect cancels a holder whose lease renewal failed the same way; the lease
  keeper does what Prefect does.
- `send_once`: one request through the client's HTTP connection without Prefect's retries.
  Prefect's client retries a 503 after a 2 s back-off, and the server answers 503 whenever its
  SQLite write is busy; for a slot acquisition, a 503 is just "ask again" (soon, like a 423).
  The public way, `temporary_settings` with no retries around each request, cost 69 ms per
  request on 2 cores, more than the request itself.
"""

from __future__ import annotations

from typing import Any

import httpx
from prefect._internal.concurrency.cancellation import CancelledError, WatcherThreadCancelScope
from prefect.client.orchestration import SyncPrefectClient

__all__ = ["CancelScope", "CancelledError", "cancel_scope", "send_once"]

CancelScope = WatcherThreadCancelScope


def cancel_scope(name: str) -> CancelScope:
    """A context manager for the calling thread's block; its `cancel()`, called from any
    thread, raises `CancelledError` in that thread (at its next Python instruction) while the
    block runs, and does nothing once the block has ended."""
    return WatcherThreadCancelScope(name=name)


def send_once(
    client: SyncPrefectClient, method: str, path: str, json: Any = None
) -> httpx.Response:
    """Send one request to the client's API, not retried and never raising for its status."""
    http = client._client
    request = http.build_request(method, path, json=json)
    # httpx.Client.send, not Prefect's subclass's send: that one retries.
    return httpx.Client.send(http, request)
