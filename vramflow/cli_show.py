"""`vramflow show`: one document's stored answers, one model and prompt at a time."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from sqlalchemy.orm import Session

from vramflow.db import reports
from vramflow.db.models import Document


def show_document(
    console: Console,
    session: Session,
    doc: Document,
    sets: list[reports.ResultSet],
    every_set: bool,
    as_json: bool,
) -> None:
    """Print the newest result set of `doc` (or each of `sets` with `every_set`), page by page.

    A document that could not be opened has no pages: it prints as one `failed` row.
    """
    if doc.status == "failed" and doc.error_message and not sets:
        _emit(console, doc, None, [reports.unopened_row(doc)], as_json, 0)
        return
    chosen = sets if every_set else sets[:1]
    for result_set in chosen or [None]:
        others = 0 if every_set else max(len(sets) - 1, 0)
        rows = reports.page_rows(session, doc, result_set)
        _emit(console, doc, result_set, rows, as_json, others)


def _emit(
    console: Console,
    doc: Document,
    result_set: reports.ResultSet | None,
    rows: list[dict[str, Any]],
    as_json: bool,
    others: int,
) -> None:
    if as_json:
        for row in rows:
            line = {"document": doc.file_name, "sha256": doc.sha256, **row}
            if result_set is not None:  # pages without a result still name the set shown
                line.update(model=result_set.model_id, prompt=result_set.prompt)
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        return
    console.rule(f"{doc.file_name} ({doc.status}, {doc.page_count or 0} pages)")
    if doc.error_message:
        console.print(f"{doc.error_type}: {doc.error_message}", style="red", markup=False)
    if result_set is not None:
        console.print(f"model {result_set.model_id}, prompt {result_set.prompt!r}", markup=False)
    if others:
        console.print(
            f"({others} other model/prompt result sets: choose with --model/--prompt, or --all)",
            markup=False,
        )
    for row in rows:
        if "page" not in row:
            continue
        body = escape(row["output"] or row["error"] or "")
        console.print(f"[bold]page {row['page']}[/bold] ({row['status']}) {body}", highlight=False)
