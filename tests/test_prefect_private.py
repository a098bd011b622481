"""The private Prefect API vramflow uses (vramflow.tasks.prefect_private), against this
Prefect version.

These fail when an upgrade of Prefect moves, renames or changes what the wrappers rely on.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from uuid import UUID

from prefect.client.orchestration import get_client

from tests.support.slots import read_limit, unique_name
from vramflow.tasks import prefect_private
from vramflow.tasks.gpu_slot import ensure_slot_limit

INCREMENT = "/v2/concurrency_limits/increment-with-lease"


def test_the_cancel_scope_throws_into_the_thread_inside_it_and_not_after_it():
    entered, outcome = threading.Event(), []
    scopes: list[prefect_private.CancelScope] = []

    def run() -> None:
        try:
            with prefect_private.cancel_scope("test scope") as scope:
                scopes.append(scope)
                entered.set()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    time.sleep(0.01)
            outcome.append("ran out of time")
        except prefect_private.CancelledError:
            outcome.append("cancelled")
        with prefect_private.cancel_scope("left scope") as left:
            scopes.append(left)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,))
    thread.start()
    assert entered.wait(30)
    assert scopes[0].cancel() is True
    thread.join(30)

    assert outcome == ["cancelled"]
    assert scopes[1].cancel() is False  # its block has ended: nothing is thrown any more
    # Not an Exception: a holder's `except Exception` does not swallow the cancellation.
    assert issubclass(prefect_private.CancelledError, asyncio.CancelledError)
    assert not issubclass(prefect_private.CancelledError, Exception)


def test_send_once_reaches_the_api_without_prefects_retrying_send(use_prefect_server, monkeypatch):
    name = unique_name("send-once")
    ensure_slot_limit(name, 1)
    body = {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": 60}
    with get_client(sync_client=True) as client:
        retrying = type(client._client)

        def no_retrying_send(*args, **kwargs):
            raise AssertionError("went through Prefect's retrying send")

        monkeypatch.setattr(retrying, "send", no_retrying_send)
        granted = prefect_private.send_once(client, "POST", INCREMENT, body)
        taken = prefect_private.send_once(client, "POST", INCREMENT, body)
        monkeypatch.undo()
        assert granted.status_code == 200, granted.text
        assert taken.status_code == 423  # returned, not raised
        client.release_concurrency_slots_with_lease(UUID(granted.json()["lease_id"]))
    assert read_limit(name).active_slots == 0
