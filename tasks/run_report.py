"""What an operator sees of a document run in the Prefect UI: its pages and a picture of the run.

Two artifacts per document run, keyed by document so runs of it line up in the Artifacts page:
`vramflow-pages-<sha prefix>`, a table with one row per page, and `vramflow-picture-<sha
prefix>`, a markdown artifact with the run's plot as a PNG `data:` URI. The Prefect UI draws
that image in the markdown; inline SVG is stripped by its sanitizer (checked in Chromium
against Prefect 3.9.1), and an image artifact would print the whole URI under the picture.

Documents run by a sweep draw no picture of their own: drawing takes 0.3-1 s of CPU in the
sweep's one process, most of what a two-page document costs there once the model is fast. The
sweep draws one picture of all its documents' calls instead (`publish_picture_of_runs`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_table_artifact,
    create_markdown_artifact,
)

from vramflow import page_table
from vramflow.db import run_views
from vramflow.db.queries import ResultKey
from vramflow.db.session import session_scope
from vramflow.timeline import Timeline

# True while a flow that runs many documents (sweep-inbox, retry-failed) runs one of them: that
# flow draws the picture of them all.
_picture_drawn_by_caller: ContextVar[bool] = ContextVar("picture_drawn_by_caller", default=False)


@contextmanager
def picture_drawn_by_caller() -> Iterator[None]:
    """Document runs started inside draw no picture of their own: the caller draws one of all.
    (A function, not the variable itself, in tasks: Prefect pickles a running task's function
    with the globals it names, for the task runs it sends to GPU workers, and a ContextVar
    does not pickle.)"""
    token = _picture_drawn_by_caller.set(True)
    try:
        yield
    finally:
        _picture_drawn_by_caller.reset(token)


def pages_key(sha256: str) -> str:
    return f"vramflow-pages-{sha256[:16]}"


def picture_key(sha256: str) -> str:
    return f"vramflow-picture-{sha256[:16]}"


async def publish_run_report(
    database_url: str, key: ResultKey, summary: dict[str, Any], sha256: str
) -> None:
    """Publish the per-page table and, when the run made model calls (and no caller draws
    them), its picture; `summary` is the flow's (its `file` and `flow_run_id`)."""
    file_name, flow_run_id = summary["file"], summary["flow_run_id"]
    lines, timeline = await asyncio.to_thread(_read, database_url, key, flow_run_id, file_name)
    if timeline.start is None or _picture_drawn_by_caller.get():
        drawing = None  # nothing ran (every page was done before), or the caller draws it
    else:  # drawn in a thread (about 0.3-1 s on 2 cores) while the table goes to the API
        drawing = asyncio.ensure_future(asyncio.to_thread(_draw, timeline))
    show = f"vramflow show {sha256[:16]}"
    await acreate_table_artifact(
        table=page_table.table_rows(lines, show),
        key=pages_key(sha256),
        description=f"Pages of {file_name} (all of them: `{show}`)",
    )
    if drawing is None:
        return
    image = await drawing
    await acreate_markdown_artifact(
        markdown=_picture_markdown(timeline, image, flow_run_id),
        key=picture_key(sha256),
        description=f"Memory and pages per second of {file_name} over the run",
    )


def publish_picture_of_runs(
    database_url: str, title: str, key: str, flow_run_ids: Collection[str]
) -> None:
    """One picture of the model calls that carried pages of any of `flow_run_ids` (a sweep's
    documents), as the markdown artifact `key`; none when there were no calls to draw."""
    runs = list(flow_run_ids)
    if not runs:
        return
    with session_scope(database_url) as session:
        timeline = run_views.timeline(session, runs, title=title)
    if timeline.start is None:
        return
    only = runs[0] if len(runs) == 1 else None
    markdown = _picture_markdown(timeline, _draw(timeline), only, len(runs))
    create_markdown_artifact(
        markdown=markdown, key=key, description=f"Memory and pages per second of {title}"
    )


def _draw(timeline: Timeline) -> str:
    from vramflow import plot  # matplotlib takes 1-2 s to import: only runs that draw pay it

    return plot.data_uri(timeline)


def _read(
    database_url: str, key: ResultKey, flow_run_id: str | None, file_name: str
) -> tuple[list[run_views.PageLine], Timeline]:
    with session_scope(database_url) as session:
        lines = run_views.page_lines(session, key)
        timeline = run_views.timeline(session, flow_run_id, title=file_name)
    return lines, timeline


def _picture_markdown(
    timeline: Timeline, image: str, flow_run_id: str | None, documents: int = 1
) -> str:
    memory = "VRAM: torch peak per call and NVML device use" if timeline.on_gpu else "RSS (CPU)"
    summary: list[Any] = [
        f"{len(timeline.calls)} model calls",
        f"{len(timeline.holds)} slot holds (shaded)",
        memory,
    ]
    if documents > 1:
        summary.insert(0, f"{documents} documents")
        where = "Each document's own picture from the command line: `vramflow plot run.png --run"
        where += " <its flow run id>`"
    else:
        command = f"vramflow plot run.png --run {flow_run_id}" if flow_run_id else "vramflow plot"
        where = f"The same picture from the command line: `{command}`"
    return (
        f"## {timeline.title}\n\n![memory and pages per second over the run]({image})\n\n"
        f"{'; '.join(summary)}. {where}\n"
    )
