"""What the sections of gpu_check.py share: their context, child processes, the card's memory
as NVML sees it, and the rows of the vramflow database they read their figures from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from isolation import own_state

HERE = Path(__file__).resolve().parent
ENTRY = HERE / "gpu_check.py"
MiB, GiB = 2**20, 2**30


class SectionError(RuntimeError):
    """A section could not finish (a child failed): its row says so and the next one runs."""


@dataclass
class Context:
    """One gpu_check run: its options, folder, Prefect server and the time it may take."""

    model: str
    model_cache_dir: Path
    device: str
    smoke: bool
    max_new_tokens: int
    max_input_tokens: int
    work: Path
    deadline: float  # time.monotonic() by which every section should be done
    api_url: str = ""
    facts: dict[str, Any] = field(default_factory=dict)  # what one section tells a later one

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def env(self, home: Path, **settings: str) -> dict[str, str]:
        """A child's environment: vramflow state of its own under `home` (only the device and
        thread choices pass through), this run's server and generation settings."""
        env = dict(os.environ)
        own_state(env, home)
        env.update(
            VRAMFLOW_MAX_INPUT_TOKENS=str(self.max_input_tokens),
            VRAMFLOW_MAX_NEW_TOKENS=str(self.max_new_tokens),
            VRAMFLOW_DEVICE=self.device,
            VRAMFLOW_INFERENCE="in-process",
            PREFECT_API_URL=self.api_url,
            PYTHONUNBUFFERED="1",
        )
        env.update(settings)
        return env


@dataclass
class Child:
    """A child process of gpu_check.py running one role, its log and its result file."""

    label: str
    process: subprocess.Popen
    out: Path
    log: Path

    def finish(self, timeout: float) -> dict[str, Any]:
        """Its result, once it exits; SectionError with its log's tail if it fails."""
        try:
            self.process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise SectionError(
                f"{self.label} ran past {timeout:.0f} s:\n{tail(self.log)}"
            ) from None
        if self.process.returncode != 0 or not self.out.exists():
            raise SectionError(
                f"{self.label} failed ({self.process.returncode}):\n{tail(self.log)}"
            )
        return json.loads(self.out.read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_child(
    ctx: Context, role: str, label: str, spec: dict[str, Any], env: dict[str, str]
) -> Child:
    """`gpu_check.py --child ROLE SPEC` with `spec` (plus its result path) in a JSON file."""
    out, log = ctx.work / f"{label}.json", ctx.work / f"{label}.log"
    spec_file = ctx.work / f"{label}.spec.json"
    spec_file.write_text(json.dumps({**spec, "out": str(out)}, default=str))
    command = [sys.executable, str(ENTRY), "--child", role, str(spec_file)]
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Child(label, process, out, log)


def run_child(
    ctx: Context, role: str, label: str, spec: dict[str, Any], env: dict[str, str]
) -> dict[str, Any]:
    """Run one child to its end within the time left (and a minute's grace)."""
    return start_child(ctx, role, label, spec, env).finish(ctx.seconds_left() + 60)


def tail(path: Path, chars: int = 2500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_for_file(path: Path, timeout: float = 600) -> None:
    """Block until `path` exists (the parent's signal to a child)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no file {path} within {timeout:g} s")
        time.sleep(0.005)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def page_texts(path: Path, count: int | None = None) -> list[str]:
    """Text of the first `count` pages (all without it)."""
    from pypdf import PdfReader

    pages = PdfReader(path).pages
    return [page.extract_text() or "" for page in pages[: count or len(pages)]]


# ----------------------------------------------------------------------- the card, from NVML


def nvml_memory(index: int = 0) -> tuple[int, int]:
    """(used, total) bytes of the card, every process included."""
    import pynvml

    pynvml.nvmlInit()
    info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
    return int(info.used), int(info.total)


class NvmlPeak:
    """Samples the card's used memory (all processes) every 20 ms in a thread."""

    def __init__(self, cuda: bool) -> None:
        self._cuda = cuda
        self.used = 0

    def __enter__(self) -> NvmlPeak:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._cuda:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.used = max(self.used, nvml_memory()[0])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def most_at_once(intervals: Iterable[tuple[Any, Any]]) -> int:
    """Most of the (start, end) intervals open at the same moment."""
    edges = []
    for start, end in intervals:
        edges += [(start, 1), (end, -1)]
    most = now = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        now += step
        most = max(most, now)
    return most


# --------------------------------------------------------------- what the database recorded


def call_figures(url: str) -> dict[str, Any]:
    """Model calls of a database: how many, out-of-memory ones, pages ok, and the slot holds."""
    from sqlalchemy import func, select

    from vramflow.db.models import Attempt, Result, SlotHold
    from vramflow.db.session import session_scope

    with session_scope(url) as session:
        calls = session.execute(select(Attempt.call_id, Attempt.outcome).distinct()).all()
        ok = session.scalar(select(func.count(Result.id)).where(Result.status == "ok"))
        holds = session.execute(
            select(SlotHold.pid, SlotHold.acquired_at, SlotHold.released_at)
        ).all()
    return {
        "calls": len(calls),
        "oom_calls": sum(1 for _, outcome in calls if outcome == "oom"),
        "pages_ok": int(ok or 0),
        "holds": [
            (pid, _stamp(acquired), _stamp(released) if released else None)
            for pid, acquired, released in holds
        ],
    }


def _stamp(moment: datetime) -> float:
    return moment.timestamp()
