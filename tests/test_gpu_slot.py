"""The GPU slot against real Prefect servers: exclusion, limit repair, turns, errors, dead
holders (tests/test_slot_records.py: the records and the waiting line themselves).

Holders record (start, end) on `time.monotonic()` (one clock for all processes on Linux) inside
the slot; two overlapping intervals mean two holders at once.
"""

from __future__ import annotations

import contextvars
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency._sync import (
    acquire_concurrency_slots_with_lease,
    release_concurrency_slots_with_lease,
)
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from tests.support.servers import (
    REPO_ROOT,
    api_url_everywhere,
    clean_env,
    free_port,
    stop_process_group,
    tail,
)
from tests.support.slots import in_threads, read_limit, unique_name, wait_until
from vramflow import slot_records
from vramflow.errors import SlotError
from vramflow.tasks.gpu_slot import SlotHold, ensure_slot_limit, gpu_slot

WORKER = REPO_ROOT / "tests" / "support" / "slot_worker.py"
START_TIMEOUT_S = 120  # a subprocess importing Prefect (and maybe starting a server) on 2 cores

Interval = tuple[int, float, float]  # (pid, start, end)


# --- helpers -----------------------------------------------------------------------------------


def find_overlaps(intervals: list[Interval]) -> list[tuple[Interval, Interval]]:
    """Pairs of intervals that intersect (each interval checked against the latest-ending one)."""
    overlaps = []
    latest: Interval | None = None
    for interval in sorted(intervals, key=lambda i: i[1]):
        if latest is not None and interval[1] < latest[2]:
            overlaps.append((latest, interval))
        if latest is None or interval[2] > latest[2]:
            latest = interval
    return overlaps


def hold_and_record(name: str, records: Path, out: list[Interval], holds: int, plain: bool):
    def work() -> None:
        for _ in range(holds):
            slot = concurrency(name, occupy=1) if plain else gpu_slot(name, records_dir=records)
            with slot:
                start = time.monotonic()
                time.sleep(0.3)
                out.append((os.getpid(), start, time.monotonic()))

    return work


def wait_for(path: Path, process: subprocess.Popen | None, log: Path | None, timeout: float):
    """Wait until `path` exists; fail at once if `process` exits first, with its log."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            pytest.fail(f"worker exited with {process.returncode}\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not appear within {timeout} s\n{tail(log)}")
        time.sleep(0.02)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen, Path]]]:
    """Start slot_worker.py subprocesses, each in its own process group, all killed at the end."""
    started: list[subprocess.Popen] = []

    def start(env: dict[str, str], *args: object) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"worker-{len(started)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(WORKER), *map(str, args)],
                env=env,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        started.append(process)
        return process, log

    yield start
    for process in started:
        stop_process_group(process, timeout=5)


def run_workers(spawn, env, name: str, tmp: Path, *, plain: bool) -> list[Interval]:
    """4 threads here and 2 subprocesses, 2 holds of 0.3 s each, all starting on one signal."""
    go, out = tmp / "go", tmp / "intervals.txt"
    workers = []
    for index in range(2):
        ready = tmp / f"ready-{index}"
        flags = ["--out", out, "--ready", ready, "--go", go]
        flags += ["--plain"] if plain else []
        workers.append((*spawn(env, "intervals", name, tmp / "records", *flags), ready))
    for process, log, ready in workers:
        wait_for(ready, process, log, START_TIMEOUT_S)
    here: list[Interval] = []
    go.touch()
    in_threads(4, hold_and_record(name, tmp / "records", here, 2, plain))
    for process, log, _ in workers:
        assert process.wait(timeout=120) == 0, tail(log)
    there = [line.split() for line in out.read_text().splitlines()]
    return here + [(int(pid), float(start), float(end)) for pid, start, end in there]


# --- exclusion ---------------------------------------------------------------------------------


def test_missing_limit_is_created_and_no_two_holders_overlap(use_prefect_server, spawn, tmp_path):
    name = unique_name("exclusive")
    with pytest.raises(ObjectNotFound):
        read_limit(name)

    env = clean_env(**use_prefect_server.env)
    intervals = run_workers(spawn, env, name, tmp_path, plain=False)

    assert len(intervals) == 12
    assert len({pid for pid, _, _ in intervals}) == 3
    assert find_overlaps(intervals) == []
    limit = read_limit(name)
    assert (limit.active, limit.limit, limit.active_slots) == (True, 1, 0)


def test_overlap_check_catches_prefects_own_concurrency_on_a_missing_limit(
    use_prefect_server, spawn, tmp_path
):
    name = unique_name("control")
    intervals = run_workers(spawn, clean_env(**use_prefect_server.env), name, tmp_path, plain=True)

    overlaps = find_overlaps(intervals)
    assert overlaps, "prefect's concurrency() on a missing limit should not have limited anything"
    assert any(a[0] != b[0] for a, b in overlaps), "expected an overlap across processes"
    with pytest.raises(ObjectNotFound):
        read_limit(name)


# --- the limit is repaired before every acquisition ----------------------------------------------


BROKEN_LIMITS = {
    "inactive": GlobalConcurrencyLimitUpdate(active=False),
    "too-large": GlobalConcurrencyLimitUpdate(limit=4),
    "decaying": GlobalConcurrencyLimitUpdate(slot_decay_per_second=5.0),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_LIMITS))
def test_a_broken_limit_is_fixed_before_acquisition(use_prefect_server, tmp_path, broken):
    name = unique_name(broken)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        client.update_global_concurrency_limit(name, BROKEN_LIMITS[broken])

    with gpu_slot(name, records_dir=tmp_path) as hold:
        limit = read_limit(name)
        assert (limit.active, limit.limit, limit.slot_decay_per_second) == (True, 1, 0)
        assert limit.active_slots == 1
        assert isinstance(hold, SlotHold) and hold.name == name
        # The server itself now refuses a second holder (as it would one in another process).
        with pytest.raises(ConcurrencySlotAcquisitionError, match="423"):
            acquire_concurrency_slots_with_lease([name], 1, max_retries=0, strict=True)


def test_a_deleted_limit_is_recreated(use_prefect_server, tmp_path):
    name = unique_name("deleted")
    with gpu_slot(name, records_dir=tmp_path):
        pass
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(name)

    with gpu_slot(name, size=2, records_dir=tmp_path):
        limit = read_limit(name)
        assert (limit.active, limit.limit, limit.active_slots) == (True, 2, 1)


def test_concurrent_setup_of_a_new_limit_all_succeed(use_prefect_server):
    name = unique_name("race")
    in_threads(6, lambda: ensure_slot_limit(name, 3))
    limit = read_limit(name)
    assert (limit.active, limit.limit) == (True, 3)


# --- turns between processes of this host ----------------------------------------------------


def test_a_process_waiting_longer_gets_the_slot_from_a_busy_process(
    use_prefect_server, spawn, tmp_path
):
    """Threads here keep taking the slot one after another; a second process gets its turn."""
    name, records, marker = unique_name("fair"), tmp_path / "records", tmp_path / "taken.json"
    ensure_slot_limit(name, 1)
    holds: list[Interval] = []

    def keep_busy() -> None:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            with gpu_slot(name, records_dir=records):
                start = time.monotonic()
                time.sleep(0.1)
                holds.append((os.getpid(), start, time.monotonic()))

    busy = [
        threading.Thread(target=contextvars.copy_context().run, args=(keep_busy,)) for _ in "ab"
    ]
    for thread in busy:
        thread.start()
    wait_until(lambda: len(holds) >= 3)
    process, log = spawn(
        clean_env(**use_prefect_server.env), "take", name, records, "--marker", marker
    )
    assert process.wait(timeout=START_TIMEOUT_S) == 0, tail(log)
    for thread in busy:
        thread.join(60)

    taken = json.loads(marker.read_text())
    # Behind a 0.1 s hold and the 0.25 s poll of the first in line.
    assert taken["wait_seconds"] < 3.0, taken
    assert len(holds) >= 4


# --- holding, waiting and errors ---------------------------------------------------------------


def test_hold_reports_wait_and_writes_a_record_while_held(use_prefect_server, tmp_path):
    name = unique_name("record")
    with gpu_slot(name, records_dir=tmp_path) as hold:
        files = list((tmp_path / name).glob("*.json"))
        assert [f.name for f in files] == [f"{hold.lease_id}.json"]
        record = slot_records.Record.from_json(files[0].read_text())
        assert (record.pid, record.lease_id) == (os.getpid(), hold.lease_id)
        assert hold.wait_seconds >= 0 and hold.acquired_at.tzinfo is not None
        assert hold.released_at is None
    assert hold.released_at is not None and hold.released_at >= hold.acquired_at
    assert list((tmp_path / name).glob("*.json")) == []
    assert read_limit(name).active_slots == 0


def test_a_busy_server_is_asked_again_soon_without_checking_the_limit_again(
    use_prefect_server, monkeypatch, tmp_path
):
    name, requests = unique_name("busy"), []
    ensure_slot_limit(name, 1)
    real_send = httpx.Client.send

    def busy_twice(client, request, **kwargs):
        """The server's answer while its SQLite database is busy, to the first two tries."""
        requests.append((request.method, request.url.path))
        tries = sum(path.endswith("/increment-with-lease") for _, path in requests)
        if request.url.path.endswith("/increment-with-lease") and tries <= 2:
            return httpx.Response(503, request=request)
        return real_send(client, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", busy_twice)
    started = time.monotonic()
    with gpu_slot(name, records_dir=tmp_path) as hold:
        waited = time.monotonic() - started
        active = read_limit(name).active_slots
    monkeypatch.undo()

    asked = [path.rsplit("/", 1)[-1] for _, path in requests]
    asked = asked[: len(asked) - asked[::-1].index("increment-with-lease")]  # until granted
    # The limit was checked once, before the first try; then three tries.
    assert asked == [name, *["increment-with-lease"] * 3] and active == 1
    assert hold.wait_seconds <= waited < 1.0  # 10 ms, then 20 ms, not a Retry-After
    assert read_limit(name).active_slots == 0


def test_gives_up_after_wait_seconds_when_another_process_holds_it(use_prefect_server, tmp_path):
    name = unique_name("timeout")
    ensure_slot_limit(name, 1)
    # Taken on the server directly: the in-process gate knows nothing of it, as with a holder
    # in another process.
    taken = acquire_concurrency_slots_with_lease([name], 1, lease_duration=60, strict=True)
    try:
        started = time.monotonic()
        with (
            pytest.raises(SlotError, match="gave up waiting"),
            gpu_slot(name, wait_seconds=1.5, records_dir=tmp_path),
        ):
            pytest.fail("got a slot that another holder has")
        assert 1.5 <= time.monotonic() - started < 6
    finally:
        release_concurrency_slots_with_lease(taken.lease_id)
    with gpu_slot(name, wait_seconds=5, records_dir=tmp_path):
        pass


def test_unreachable_api_is_one_clear_slot_error_quickly(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    with api_url_everywhere(url):
        started = time.monotonic()
        with (
            pytest.raises(SlotError) as caught,
            gpu_slot(unique_name("unreachable"), records_dir=tmp_path),
        ):
            pytest.fail("got a slot without a server")
        elapsed = time.monotonic() - started
    message = str(caught.value)
    assert message.startswith(f"cannot reach the Prefect API at {url}: is the server running?")
    assert "\n" not in message
    assert elapsed < 10


# --- dead holders --------------------------------------------------------------------------------


def test_slot_of_a_killed_holder_goes_to_a_waiting_acquirer_on_a_real_server(
    use_prefect_server, spawn, tmp_path
):
    name, records = unique_name("killed"), tmp_path / "records"
    env = clean_env(**use_prefect_server.env)
    marker = tmp_path / "holding"
    holder, log = spawn(env, "hold", name, records, "--marker", marker)
    wait_for(marker, holder, log, START_TIMEOUT_S)
    assert read_limit(name).active_slots == 1

    got = threading.Event()

    def acquire() -> None:
        with gpu_slot(name, wait_seconds=40, records_dir=records):
            got.set()

    waiter = threading.Thread(target=contextvars.copy_context().run, args=(acquire,))
    waiter.start()
    try:
        assert not got.wait(3), "got the slot while its holder was alive"
        killed = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        assert got.wait(20), "the dead holder's slot was not recovered"
        assert time.monotonic() - killed < 15  # the lease alone would take 60 s or more
    finally:
        waiter.join(60)
    assert read_limit(name).active_slots == 0
    assert list((records / name).glob("*.json")) == []


def test_slot_of_a_killed_holder_is_recovered_on_the_temporary_server(spawn, tmp_path):
    # No PREFECT_API_URL: each process starts its own temporary server on one shared database.
    env = clean_env(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    name, records = unique_name("killed-local"), tmp_path / "records"
    holding, ready, taken = tmp_path / "holding", tmp_path / "taker-ready", tmp_path / "taken"
    holder, holder_log = spawn(env, "hold", name, records, "--marker", holding)
    taker, taker_log = spawn(
        env, "take", name, records, "--marker", taken, "--ready", ready, "--go", holding
    )
    wait_for(holding, holder, holder_log, START_TIMEOUT_S)
    wait_for(ready, taker, taker_log, START_TIMEOUT_S)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert not taken.exists(), "the taker got the slot while its holder was alive"
        time.sleep(0.1)

    killed = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    wait_for(taken, taker, taker_log, 30)
    assert time.monotonic() - killed < 15, tail(taker_log)
    report = json.loads(taken.read_text())
    assert report["active_slots_after"] == 0
    assert taker.wait(timeout=30) == 0, tail(taker_log)
