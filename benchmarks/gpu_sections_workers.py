"""gpu_check.py's GPU-worker section: three `vramflow gpu-worker` processes on one card.

Three real GPU workers serve one Prefect server and one database; a driver process runs the
`sweep-inbox` flow over three documents side by side, whose batches reach the workers through
the server (VRAMFLOW_INFERENCE=gpu-worker). The device's slot (one holder by default) lets one
worker at a time keep its weights on the card. The checks: every page answered, no call out of
memory, never two holders on the card at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpu_report import Check, at_least, equals, info
from gpu_support import Context, call_figures, most_at_once, run_child, say, tail
from pages import write_prose_pdf

SECTION = "three GPU workers on one card"
WORKERS = 3
DOCUMENTS, PAGES, SMOKE_PAGES = 3, 16, 2
BATCH = 8
ESTIMATE_SECONDS = 70


def run(ctx: Context) -> tuple[list[Check], dict[str, Any]]:
    folder = ctx.work / "workers"
    inbox = folder / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    pages = SMOKE_PAGES if ctx.smoke else PAGES
    for number in range(1, DOCUMENTS + 1):  # different prose each: one document is swept once
        write_prose_pdf(inbox / f"document-{number}.pdf", pages, seed=number)
    url = f"sqlite:///{folder / 'workers.db'}"
    env = ctx.env(
        folder / "home",
        VRAMFLOW_INFERENCE="gpu-worker",
        VRAMFLOW_DATABASE_URL=url,
        VRAMFLOW_GPU_WORKER_HEARTBEAT_SECONDS="1",
        VRAMFLOW_BATCH_SIZE=str(BATCH),
        VRAMFLOW_MODEL=ctx.model,
    )
    _share_model_cache(ctx, folder / "home")
    workers = [_start_worker(ctx, env, folder / f"gpu-worker-{i}.log") for i in range(WORKERS)]
    try:
        for process, log in workers:
            _wait_until_serving(url, process, log)
        say(f"{SECTION}: {WORKERS} serving; sweeping {DOCUMENTS} documents")
        driven = run_child(ctx, "drive", "workers-drive", {"inbox": inbox}, env)
    finally:
        for process, _ in workers:
            _stop(process)
    result = {**call_figures(url), **driven, "pages": DOCUMENTS * pages}
    return checks(result), result


def checks(result: dict[str, Any]) -> list[Check]:
    holds = [(a, r) for _, a, r in result["holds"] if r is not None]
    holders = len({pid for pid, _, _ in result["holds"]})
    rate = result["pages_ok"] / result["wall_seconds"] if result["wall_seconds"] else None
    return [
        info(SECTION, "pages/s over the sweep", "-" if rate is None else f"{rate:.3g}"),
        info(SECTION, "workers that held the slot", f"{holders} of {WORKERS}"),
        equals(SECTION, "pages ok", result["pages_ok"], result["pages"]),
        equals(SECTION, "out-of-memory calls", result["oom_calls"], 0),
        Check(
            SECTION,
            "most holders on the card at once",
            str(most_at_once(holds)),
            "<= 1",
            most_at_once(holds) <= 1,
        ),
        at_least(SECTION, "model calls", result["calls"], 1, "d"),
    ]


def _share_model_cache(ctx: Context, home: Path) -> None:
    """The workers convert the packaged model into their home: point it at the one already
    converted instead of converting it three times."""
    home.mkdir(parents=True, exist_ok=True)
    models = home / "models"
    if not models.exists():
        Path(ctx.model_cache_dir).mkdir(parents=True, exist_ok=True)
        models.symlink_to(Path(ctx.model_cache_dir).resolve(), target_is_directory=True)


def _start_worker(ctx: Context, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, Path]:
    command = [sys.executable, "-m", "vramflow", "gpu-worker", "--preload", ctx.model]
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return process, log


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout=300) -> None:
    """Until the worker records heartbeats and serves the inference task."""
    from vramflow.db import workers
    from vramflow.db.session import session_scope

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"a GPU worker exited with {process.returncode}:\n{tail(log)}")
        try:
            with session_scope(url) as session:
                live = [w for w in workers.alive(session, 5) if w.pid == process.pid]
        except Exception:  # its tables are not there yet
            live = []
        if live and "Subscribing to runs of task" in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"a GPU worker was not serving within {timeout} s:\n{tail(log)}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def drive(spec: dict[str, Any]) -> None:
    """Child: sweep the inbox, its documents side by side, their batches to the GPU workers."""
    from vramflow.flows.sweep_inbox import sweep_inbox

    started = time.perf_counter()
    summary = sweep_inbox(str(spec["inbox"]), documents_at_once=DOCUMENTS, return_state=True)
    wall = time.perf_counter() - started
    Path(spec["out"]).write_text(json.dumps({"wall_seconds": wall, "state": summary.type.value}))
