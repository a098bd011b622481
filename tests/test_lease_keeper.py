"""The GPU slot's lease keeper against a real Prefect server: renewal, and a lost lease."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
from prefect.concurrency._sync import (
    acquire_concurrency_slots_with_lease,
    release_concurrency_slots_with_lease,
)

from tests.support.slots import read_limit, unique_name, wait_until
from vramflow.tasks import lease_keeper
from vramflow.tasks.gpu_slot import ensure_slot_limit, gpu_slot
from vramflow.tasks.lease_keeper import LeaseKeeper, LeaseLost
from vramflow.tasks.prefect_private import CancelledError

QUICK = 0.05  # seconds between renewals in these tests (in use: 45 s of a 60 s lease)


def take_lease(name: str):
    ensure_slot_limit(name, 1)
    return acquire_concurrency_slots_with_lease([name], 1, lease_duration=60, strict=True)


def hold_until_cancelled(
    hold: Callable[[], AbstractContextManager], outcome: list[str], held: list | None = None
) -> threading.Thread:
    """A thread that enters `hold()`, notes what it yields in `held`, and works in small steps
    until something stops it (at most 30 s); `outcome` says which."""

    def run() -> None:
        try:
            with hold() as value:
                if held is not None:
                    held.append(value)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    time.sleep(0.01)
            outcome.append("ran out of time")
        except CancelledError:
            outcome.append("cancelled")

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,))
    thread.start()
    return thread


def test_the_keeper_renews_on_a_timer_until_stopped(use_prefect_server):
    name = unique_name("renew")
    lease = take_lease(name)
    keeper = LeaseKeeper(lease.lease_id, 60, every_seconds=QUICK)
    keeper.start()
    wait_until(lambda: keeper.renewals >= 3)
    keeper.stop()
    renewals = keeper.renewals
    keeper._thread.join(10)

    assert not keeper.lost and not keeper._thread.is_alive()
    assert keeper.renewals <= renewals + 1  # at most the one in flight when it was stopped
    release_concurrency_slots_with_lease(lease.lease_id)
    assert read_limit(name).active_slots == 0


def test_a_revoked_lease_cancels_its_holder_and_refuses_the_next(use_prefect_server):
    name = unique_name("revoked")
    lease = take_lease(name)
    keeper = LeaseKeeper(lease.lease_id, 60, every_seconds=QUICK)
    keeper.start()
    outcome: list[str] = []
    holder = hold_until_cancelled(keeper.holding, outcome)
    wait_until(lambda: keeper.renewals >= 1)

    release_concurrency_slots_with_lease(lease.lease_id)  # the server no longer knows it
    holder.join(30)

    assert outcome == ["cancelled"] and keeper.lost
    with pytest.raises(LeaseLost), keeper.holding():
        pass


def test_a_holder_whose_lease_is_revoked_stops_and_the_next_gets_a_new_lease(
    use_prefect_server, monkeypatch, tmp_path
):
    monkeypatch.setattr(lease_keeper, "RENEWAL_FRACTION", QUICK / 60)
    name, taken, outcome = unique_name("revoked-held"), [], []

    holder = hold_until_cancelled(lambda: gpu_slot(name, records_dir=tmp_path), outcome, taken)
    wait_until(lambda: bool(taken))
    release_concurrency_slots_with_lease(taken[0].lease_id)  # revoked while held
    holder.join(30)

    assert outcome == ["cancelled"]
    assert list((tmp_path / name).glob("*.json")) == []  # its record went with it
    # The server counts the next holder's new lease alone.
    with gpu_slot(name, wait_seconds=5, records_dir=tmp_path) as next_hold:
        assert next_hold.lease_id != taken[0].lease_id
        assert read_limit(name).active_slots == 1
    assert read_limit(name).active_slots == 0


def test_renewals_reach_the_api_the_lease_came_from(prefect_server):
    """A settings context (not the environment) names the server, as in a flow run."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        name = unique_name("context")
        lease = take_lease(name)
        keeper = LeaseKeeper(lease.lease_id, 60, every_seconds=QUICK)
        keeper.start()
        wait_until(lambda: keeper.renewals >= 2 or keeper.lost)
        keeper.stop()
        release_concurrency_slots_with_lease(lease.lease_id)
    assert not keeper.lost
