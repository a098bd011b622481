"""`vramflow plot` and `vramflow status`: what an operator looks at while runs go on."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vramflow.config import Settings
from vramflow.errors import VramflowError

console = Console(width=None if sys.stdout.isatty() else 140)


def plot(
    file: Annotated[Path, typer.Argument(help="Where to write the picture: a .png or .html file.")],
    run: Annotated[
        str | None, typer.Option(help="Flow run id (default: the run of the latest model call).")
    ] = None,
    document: Annotated[
        str | None, typer.Option(help="Latest run of this PDF, sha256 prefix or file name.")
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(min=0.1, help="Every run's calls in the last N minutes, instead of one run."),
    ] = None,
) -> None:
    """Draw memory and pages per second over a run, with the GPU slot's holds marked.

    Example: vramflow plot run.png --document report.pdf
    """
    from vramflow import plot as plotting
    from vramflow.db import run_views
    from vramflow.db.schema import ensure_schema
    from vramflow.db.session import session_scope

    settings = Settings()
    ensure_schema(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        if minutes is not None:
            since = datetime.now(timezone.utc) - timedelta(minutes=minutes)
            title = f"every run, last {minutes:g} minutes"
            timeline = run_views.timeline(session, since=since, title=title)
        else:
            run = run or _latest_run(session, document)
            timeline = run_views.timeline(session, run, title=f"flow run {run}")
    written = plotting.write(timeline, file)
    console.print(f"{written}: {len(timeline.calls)} model calls, {len(timeline.holds)} slot holds")


def _latest_run(session: Any, document: str | None) -> str:
    from vramflow import pdf
    from vramflow.db import reports, run_views

    document_id = None
    if document is not None:
        path = Path(document)
        sha = pdf.file_sha256(path) if path.is_file() else None
        found = reports.find_documents(session, document, sha)
        if not found:
            raise VramflowError(f"no stored document matches {document!r}")
        document_id = found[0].id
    run = run_views.latest_flow_run(session, document_id)
    if run is None:
        raise VramflowError("nothing to plot: no model calls recorded yet")
    return run


def status(
    minutes: Annotated[
        float, typer.Option(min=0.1, help="Window of the recent throughput, in minutes.")
    ] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Print each device's GPU slot, the queue and the recent throughput.

    Slots come from the Prefect API (PREFECT_API_URL, else Prefect's temporary server),
    holders from the database, waiters from this host's slot records.

    Example: vramflow status --minutes 15
    """
    from vramflow import slot_records
    from vramflow.db import status as queries
    from vramflow.db.schema import ensure_schema
    from vramflow.db.session import session_scope

    settings = Settings()
    ensure_schema(settings.resolved_database_url)
    limits = _read_limits(settings.slot_name_template)
    with session_scope(settings.resolved_database_url) as session:
        holds = queries.open_holds(session)
        queue = queries.queue(session)
        rate = queries.throughput(session, minutes)
        workers = queries.gpu_workers(session, settings.gpu_worker_timeout_seconds)
    names = sorted({limit.name for limit in limits} | {h.slot_name for h in holds})
    by_name = {limit.name: limit for limit in limits}
    slots = [
        {
            "slot": name,
            "limit": getattr(by_name.get(name), "limit", None),
            "active_slots": getattr(by_name.get(name), "active_slots", None),
            "active": getattr(by_name.get(name), "active", None),
            "holders": [_holder(h) for h in holds if h.slot_name == name],
            "waiting_here": len(slot_records.waiters(settings.slot_records_dir, name)),
        }
        for name in names
    ]
    report = {
        "slots": slots,
        "gpu_workers": [vars(w) for w in workers],
        "queue": {
            "running": queue.running,
            "pending": queue.pending,
            "oldest_since": _iso(queue.oldest_since),
        },
        "throughput": {
            "minutes": minutes,
            "pages": rate.pages,
            "pages_per_second": round(rate.pages_per_second, 4),
            "calls_ok": rate.calls_ok,
            "calls_oom": rate.calls_oom,
            "tokens_out": rate.tokens_out,
        },
    }
    if as_json:
        sys.stdout.write(json.dumps(report, default=str) + "\n")
    else:
        _print_status(report)


def _read_limits(template: str) -> list[Any]:
    from vramflow.cli import _prepare_prefect

    _prepare_prefect(verbose=False)
    from vramflow.tasks.slot_status import device_slots

    try:
        return device_slots(template)
    except Exception as exc:  # an unreachable API: say so, show what the database knows
        console.print(f"[yellow]Prefect API not reachable ({type(exc).__name__}: {exc})[/yellow]")
        return []


def _holder(hold: Any) -> dict[str, Any]:
    return {
        "host": hold.host,
        "pid": hold.pid,
        "flow_run_id": hold.flow_run_id,
        "since": _iso(hold.acquired_at),
        "pages": hold.pages,
    }


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite keeps no zone; vramflow stores UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _print_status(report: dict[str, Any]) -> None:
    table = Table(title="GPU slots")
    for column in ("slot", "limit", "in use", "holder", "since", "waiting (this host)"):
        table.add_column(column)
    for slot in report["slots"]:
        limit = "-" if slot["limit"] is None else str(slot["limit"])
        if slot["active"] is False:
            limit += " (inactive)"
        in_use = "-" if slot["active_slots"] is None else str(slot["active_slots"])
        holders = slot["holders"] or [None]
        for i, holder in enumerate(holders):
            who = "-" if holder is None else _who(holder)
            since = "-" if holder is None else holder["since"]
            first = i == 0
            table.add_row(
                slot["slot"] if first else "",
                limit if first else "",
                in_use if first else "",
                who,
                since,
                str(slot["waiting_here"]) if first else "",
            )
    console.print(table if report["slots"] else "GPU slots: none found")
    workers = [
        f"{w['host']} pid {w['pid']} ({w['device']}, {w['pages_waiting']} pages waiting, "
        f"heartbeat {_iso(w['heartbeat_at'])})"
        for w in report["gpu_workers"]
    ]
    console.print("GPU workers: " + (", ".join(workers) or "none on record"))

    queue, rate = report["queue"], report["throughput"]
    oldest = f", oldest since {queue['oldest_since']}" if queue["oldest_since"] else ""
    console.print(f"Queue: {queue['running']} pages running, {queue['pending']} pending{oldest}")
    console.print(
        f"Last {rate['minutes']:g} min: {rate['pages']} pages answered "
        f"({rate['pages_per_second']:.3f} pages/s); model calls: {rate['calls_ok']} ok, "
        f"{rate['calls_oom']} out of memory; {rate['tokens_out']} tokens generated"
    )


def _who(holder: dict[str, Any]) -> str:
    run = f", flow run {holder['flow_run_id'][:8]}" if holder["flow_run_id"] else ""
    return f"{holder['host']} pid {holder['pid']}{run}"
