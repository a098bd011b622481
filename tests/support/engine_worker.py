"""A separate process with a vramflow engine, for tests of several holders of one device.

    python tests/support/engine_worker.py MODEL --pages N --out F --ready F --go F

Loads MODEL, signals ready, waits for the go file, then answers N pages through
`vramflow.tasks.engine_host`'s engine (the real GPU slot on the Prefect server of
PREFECT_API_URL, with the admission and device settings of the environment) and writes one JSON
line per hold to --out: pid, start and end (time.time()), the slots it occupied and the model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from tests.support.slot_worker import wait_for_file, write_atomically


class HoldsToFile:
    """A recorder that keeps only the holds, as JSON lines."""

    def __init__(self, out: Path, occupied: int, model: str) -> None:
        self.out, self.occupied, self.model = out, occupied, model

    def hold_started(self, group, hold_id, hold, device) -> None:
        self.started = time.time()

    def call_finished(self, group, record, jobs, hold_id, slot_wait) -> None:
        pass

    def hold_finished(self, group, hold_id, hold, move_in, move_out, pages) -> None:
        line = {"pid": os.getpid(), "start": self.started, "end": time.time()}
        line.update(occupied=self.occupied, model=self.model, pages=pages)
        with open(self.out, "a") as out:
            out.write(json.dumps(line) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--go", type=Path, required=True)
    args = parser.parse_args()

    from vramflow.config import Settings
    from vramflow.engine import Engine, PageJob
    from vramflow.inference import PageInput
    from vramflow.tasks import engine_host

    settings = Settings(model=args.model)
    parts = engine_host.engine_parts(settings, "cpu")
    loaded = parts.load(args.model)
    occupied = engine_host.Grants(settings, "cpu").need(loaded)
    engine = Engine(replace(parts, recorder=HoldsToFile(args.out, occupied, args.model)))
    write_atomically(args.ready, str(os.getpid()))
    wait_for_file(args.go, timeout=120)
    jobs = [
        PageJob(PageInput(n, f"Page {n} of a report about memory.", key=n), None)
        for n in range(1, args.pages + 1)
    ]
    outcome = engine.submit(engine_host.call_group(settings), jobs, settings.batch_size)
    assert len(outcome.result(timeout=600).ok) == args.pages
    # A request is answered inside its hold; the hold's line is written once it ends.
    deadline = time.monotonic() + 60
    while _pages_written(args.out) < args.pages and time.monotonic() < deadline:
        time.sleep(0.05)


def _pages_written(out: Path) -> int:
    if not out.exists():
        return 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return sum(line["pages"] for line in lines if line["pid"] == os.getpid())


if __name__ == "__main__":
    main()
