"""`vramflow run`'s work: the temporary server, one flow run per file, Ctrl-C, the summary."""

from __future__ import annotations

import asyncio
import atexit
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vramflow import orphans, progress
from vramflow.config import Settings

# The shell's code for a command stopped by SIGINT.
INTERRUPTED_EXIT = 130
# This process's record of its temporary server, removed when the server stops.
_server_record: list[Path] = []


def run_files(
    files: list[Path], parameters: dict[str, Any], settings: Settings, err: Console
) -> list[dict[str, Any]]:
    """Run `process-pdf` on each file in turn; one summary per file. Ctrl-C stops the command
    with one line saying what was kept (and exits 130)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from vramflow.db.models import utcnow
    from vramflow.flows.process_pdf import process_pdf

    start_temporary_server(settings, err)
    flow = process_pdf.with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=settings.task_workers)
    )
    summaries = []
    with _progress_bar(err):
        for file in files:
            started, since = time.perf_counter(), utcnow()
            try:
                state = _run_in_thread(flow(path=str(file), **parameters, return_state=True))
            except KeyboardInterrupt:
                _stop(err, settings, file, since)
            summary = _summary(file, state)
            summary["wall_seconds"] = time.perf_counter() - started
            summaries.append(summary)
    return summaries


def flow_parameters(
    overrides: dict[str, Any], pages: str | None, force: bool, password: str | None
) -> dict[str, Any]:
    """`process-pdf`'s parameters: the settings given on the command line, the pages to do and
    the password."""
    from pydantic import SecretStr

    return {
        **overrides,
        "pages": pages,
        "force": force,
        # Prefect stores a SecretStr parameter as "**********", never in plain text.
        "password": SecretStr(password) if password is not None else None,
    }


def say_if_no_gpu_worker(settings: Settings, err: Console) -> None:
    """With a Prefect server the pages go to GPU workers: say so up front when none is alive."""
    from vramflow.tasks.dispatch import uses_gpu_workers

    if not uses_gpu_workers(settings):
        return
    from vramflow.db import workers
    from vramflow.db.schema import ensure_schema
    from vramflow.db.session import session_scope

    ensure_schema(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        if workers.alive(session, settings.gpu_worker_timeout_seconds):
            return
    err.print(
        "no GPU worker is running for this database: start `vramflow gpu-worker` (the pages "
        f"wait up to {settings.gpu_worker_wait_seconds:g} s for one), or set "
        "VRAMFLOW_INFERENCE=in-process to load the model in this process"
    )


def _run_in_thread(coroutine: Any) -> Any:
    """Run the flow on a thread of its own, so that Ctrl-C reaches this (main) thread at once:
    `asyncio.run` in the main thread would first wait for the batches in flight to finish."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["state"] = asyncio.run(coroutine)
        except BaseException as exc:  # handed to the main thread as it is
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="vramflow-run", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # a join with a timeout lets KeyboardInterrupt through
    if "error" in outcome:
        raise outcome["error"]
    return outcome["state"]


def start_temporary_server(settings: Settings, err: Console) -> None:
    """Without PREFECT_API_URL: stop temporary servers that killed vramflow runs left behind,
    then start Prefect's temporary server and record it, so the next run can do the same."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    folder = settings.home / "servers"
    for pid in orphans.stop_orphans(folder):
        err.print(f"stopped the temporary Prefect server (pid {pid}) of an earlier vramflow run")
    server = SubprocessASGIServer()  # the one Prefect's clients use without PREFECT_API_URL
    server.start()
    if server.server_process is not None:
        _server_record.append(orphans.record_server(folder, server.server_process.pid))
        atexit.register(_server_record[-1].unlink, missing_ok=True)


def _progress_bar(err: Console) -> Progress:
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def on_progress(document: str, finished: int, planned: int) -> None:
        if document not in tasks:
            tasks[document] = bar.add_task(document, total=planned or 1)
        bar.update(tasks[document], completed=finished if planned else 1)

    progress.subscribe(on_progress)
    return bar


def _summary(file: Path, state: Any) -> dict[str, Any]:
    """The flow's summary (also carried by a run that ended Failed for failed pages), or the
    reason a document could not be run at all."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, dict) and "pages_ok" in data:
        return dict(data)
    return {"file": file.name, "status": "failed", "error": state.message or state.name}


def _stop(err: Console, settings: Settings, file: Path, since: Any) -> None:
    """After Ctrl-C: make the statuses true, say in one line what was kept, and exit at once.

    Exiting without waiting: the task runner's threads would otherwise finish their batches
    first. What they have not stored is not done, and a re-run does it.
    """
    from vramflow import pdf
    from vramflow.db.queries import mark_stopped
    from vramflow.db.session import session_scope
    from vramflow.tasks.infer import stop_claims

    stop_claims()  # no page becomes `running` after the statuses below are written
    if (engine_host := sys.modules.get("vramflow.tasks.engine_host")) is not None:
        engine_host.stop_writes()  # and no answer is stored after they are counted
    with session_scope(settings.resolved_database_url) as session:
        kept = mark_stopped(session, str(file.expanduser().resolve()), since)
    name, answered = kept if kept else (file.name, 0)
    err.print(
        f"interrupted: {escape(name)}: {answered} pages answered in this run are stored;"
        " run the same command again to resume (pages already done are skipped)",
        highlight=False,
        soft_wrap=True,
    )
    pdf.shutdown_workers()
    for record in _server_record:  # by its pid: exiting here skips Prefect's own clean-up
        orphans.stop_recorded(record)
    err.file.flush()
    os._exit(INTERRUPTED_EXIT)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def _peak(summary: dict[str, Any]) -> str:
    if summary["peak_vram_bytes"] is not None:
        return f"{_mib(summary['peak_vram_bytes'])} VRAM"
    return "-" if summary["peak_rss_bytes"] is None else f"{_mib(summary['peak_rss_bytes'])} RSS"


HEADERS = (
    "document",
    "status",
    "ok",
    "failed",
    "no text",
    "done before",
    "pages/s",
    "peak memory",
    "slot wait",
)


def print_run_summary(console: Console, summaries: list[dict[str, Any]]) -> None:
    """The summary table, then one line per document that failed or had nothing to do, and
    the first page errors."""
    table = Table(title="vramflow run")
    table.add_column(HEADERS[0], no_wrap=True)
    for column in HEADERS[1:]:
        table.add_column(column, overflow="fold")
    for s in summaries:
        if "error" in s:
            table.add_row(s["file"], "failed", *["-"] * (len(HEADERS) - 2))
            continue
        rate = s["pages_inferred"] / s["wall_seconds"] if s["wall_seconds"] else 0.0
        counts = (s["pages_ok"], s["pages_failed"], s["pages_no_text"], s["pages_already_done"])
        table.add_row(
            s["file"],
            s["status"],
            *map(str, counts),
            f"{rate:.2f}",
            _peak(s),
            f"{s['slot_wait_seconds']:.1f} s",
        )
    console.print(table)
    for s in summaries:
        if "error" in s:
            console.print(f"[red]{escape(s['file'])}[/red]: {escape(s['error'])}")
        elif s["pages_inferred"] == 0 and s["pages_already_done"]:
            console.print(
                f"{s['file']}: all {s['pages_already_done']} pages already done "
                "for this model and prompt (use --force to redo them)"
            )
        for page, error in s.get("errors", [])[:10]:
            console.print(f"{s['file']} page {page}: {error}", markup=False)
