"""A separate process that takes the GPU slot, for tests that need more than one process.

    python tests/support/slot_worker.py intervals NAME RECORDS --out F --ready F --go F
        wait for the go file, hold the slot --holds times for --hold-seconds each and append one
        "pid start end" line (time.monotonic, shared by all processes) per hold to --out;
        --plain uses prefect's own `concurrency()` instead of `gpu_slot` (the broken control).
    python tests/support/slot_worker.py hold NAME RECORDS --marker F
        take the slot, write the marker (JSON: pid, lease_id) and sleep until killed.
    python tests/support/slot_worker.py take NAME RECORDS --marker F --ready F --go F
        wait for the go file, take the slot, release it and write the marker (JSON: wait_seconds,
        active_slots_after: the limit's occupied slots after the release).

The Prefect API comes from the environment (PREFECT_API_URL, or none: the temporary server).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["intervals", "hold", "take"])
    parser.add_argument("name")
    parser.add_argument("records", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--go", type=Path)
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--holds", type=int, default=2)
    parser.add_argument("--hold-seconds", type=float, default=0.3)
    parser.add_argument("--plain", action="store_true")
    args = parser.parse_args()
    _connect()
    if args.ready:
        write_atomically(args.ready, str(os.getpid()))
    if args.go:
        wait_for_file(args.go, timeout=120)
    {"intervals": intervals, "hold": hold, "take": take}[args.command](args)


def intervals(args: argparse.Namespace) -> None:
    with open(args.out, "a") as out:
        for _ in range(args.holds):
            with slot(args.name, args.records, plain=args.plain):
                start = time.monotonic()
                time.sleep(args.hold_seconds)
                end = time.monotonic()
            out.write(f"{os.getpid()} {start} {end}\n")
            out.flush()


def hold(args: argparse.Namespace) -> None:
    with slot(args.name, args.records) as held:
        write_atomically(args.marker, json.dumps({"pid": os.getpid(), "lease": str(held)}))
        time.sleep(3600)


def take(args: argparse.Namespace) -> None:
    from prefect.client.orchestration import get_client

    asked = time.monotonic()
    with slot(args.name, args.records):
        waited = time.monotonic() - asked
    with get_client(sync_client=True) as client:
        active = client.read_global_concurrency_limit_by_name(args.name).active_slots
    report = {"pid": os.getpid(), "wait_seconds": waited, "active_slots_after": active}
    write_atomically(args.marker, json.dumps(report))


def slot(name: str, records: Path, plain: bool = False):
    """`gpu_slot` (yielding the lease id), or prefect's plain `concurrency()`."""
    import contextlib

    from prefect.concurrency.sync import concurrency

    from vramflow.tasks.gpu_slot import gpu_slot

    if plain:
        return concurrency(name, occupy=1)

    @contextlib.contextmanager
    def held():
        with gpu_slot(name, records_dir=records) as hold:
            yield hold.lease_id

    return held()


def _connect() -> None:
    """Reach the API (starting the temporary server if there is none) before signalling ready."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise error


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


if __name__ == "__main__":
    main()
