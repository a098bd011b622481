"""On-disk holder records and the waiting line of this host's processes (vramflow.slot_records),
and the GPU slot keeping its place in that line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.slots import in_threads, read_limit, unique_name
from vramflow import slot_records
from vramflow.errors import SlotError
from vramflow.tasks.gpu_slot import ensure_slot_limit, gpu_slot


@pytest.fixture
def another_waiting_process(tmp_path: Path) -> Iterator[Callable[[str], None]]:
    """Put a live process of this host in the waiting line of a slot, ahead of this one."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

    def stand_in_line(name: str) -> None:
        folder = tmp_path / name / "waiting"
        folder.mkdir(parents=True, exist_ok=True)
        create_time = psutil.Process(sleeper.pid).create_time()
        waiter = slot_records.Waiter(sleeper.pid, create_time, time.time() - 60)
        (folder / f"{sleeper.pid}.json").write_text(json.dumps(dataclasses.asdict(waiter)))

    yield stand_in_line
    sleeper.kill()
    sleeper.wait()


def a_record(name: str, **changes) -> slot_records.Record:
    record = slot_records.current_holder(name, uuid.uuid4(), uuid.uuid4())
    return dataclasses.replace(record, **changes)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_records_of_dead_processes_on_this_host_are_claimed(tmp_path):
    name = "slot"
    alive = a_record(name)
    dead = a_record(name, pid=dead_pid())
    reused = a_record(name, create_time=alive.create_time - 3600)  # our pid, an older process
    elsewhere = a_record(name, pid=dead_pid(), host="another-host")
    for record in (alive, dead, reused, elsewhere):
        slot_records.write_record(tmp_path, record)

    claimed = slot_records.claim_dead_records(tmp_path, name)

    assert sorted(r.lease_id for r in claimed) == sorted([dead.lease_id, reused.lease_id])
    assert dead in claimed
    assert slot_records.claim_dead_records(tmp_path, name) == []
    assert not slot_records.remove_record(tmp_path, name, dead.lease_id)
    assert slot_records.remove_record(tmp_path, name, alive.lease_id)
    assert slot_records.claim_dead_records(tmp_path, "never-used") == []


def test_each_dead_record_goes_to_exactly_one_of_racing_claimers(tmp_path):
    pid = dead_pid()
    written = {a_record("slot", pid=pid).lease_id for _ in range(40)}
    for lease_id in written:
        slot_records.write_record(tmp_path, a_record("slot", pid=pid, lease_id=lease_id))
    claims: list[uuid.UUID] = []
    in_threads(
        8,
        lambda: claims.extend(
            r.lease_id for r in slot_records.claim_dead_records(tmp_path, "slot")
        ),
    )
    assert sorted(claims) == sorted(written)


def test_the_waiting_line_ignores_dead_and_stale_waiters_and_orders_by_waiting_time(
    tmp_path, another_waiting_process
):
    name = "line"
    with slot_records.waiting_line(tmp_path, name) as line:
        assert line.ahead() == [] and not slot_records.others_waiting(tmp_path, name)
        folder = tmp_path / name / "waiting"
        dead = slot_records.Waiter(pid=2**22 + 7, create_time=1.0, since=0.0)
        (folder / f"{dead.pid}.json").write_text(json.dumps(dataclasses.asdict(dead)))
        assert line.ahead() == []  # a process that is gone holds nobody up

        another_waiting_process(name)  # alive, and waiting since a minute ago
        [ahead] = line.ahead()
        assert slot_records.others_waiting(tmp_path, name)
        marker = folder / f"{ahead.pid}.json"
        os.utime(marker, (time.time() - 60, time.time() - 60))
        assert line.ahead() == []  # not refreshed for a minute: stopped, or stuck

        line.refresh()  # our own marker stays fresh
        assert (folder / f"{os.getpid()}.json").exists()
    assert not (folder / f"{os.getpid()}.json").exists()


def test_a_process_that_waited_longer_asks_the_server_first(
    use_prefect_server, tmp_path, another_waiting_process
):
    name = unique_name("in-line")
    ensure_slot_limit(name, 1)
    another_waiting_process(name)  # alive, waiting since a minute ago, and never asking

    # The slot is free on the server, but the process ahead in line is to have it first.
    with (
        pytest.raises(SlotError, match="stayed taken"),
        gpu_slot(name, wait_seconds=1.5, records_dir=tmp_path),
    ):
        pytest.fail("asked the server while a process that waited longer stood in line")
    assert read_limit(name).active_slots == 0
    for marker in (tmp_path / name / "waiting").glob("*.json"):
        marker.unlink()  # that process leaves the line
    with gpu_slot(name, wait_seconds=5, records_dir=tmp_path):
        assert read_limit(name).active_slots == 1
