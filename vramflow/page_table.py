"""A document's pages as table rows a person can read, even for a document of 5,000 pages.

A long document shows its first pages and every failure (up to a limit); one last row counts
the pages left out and gives the command that prints them all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from vramflow.db.run_views import PageLine

FIRST_ROWS = 20
MOST_FAILURES = 50
ANSWER_CHARS = 100
# The answer last: the UI's table is as wide as its widest cell, and the figures before it stay
# in view.
COLUMNS = (
    "page",
    "status",
    "tokens in",
    "tokens out",
    "model s",
    "peak memory",
    "attempts",
    "answer",
)


def table_rows(lines: Sequence[PageLine], show_command: str) -> list[dict[str, Any]]:
    """Rows for `lines` (all of them when few), with a last row counting those left out."""
    failed = [line for line in lines if line.status == "failed"]
    if len(lines) <= FIRST_ROWS + MOST_FAILURES and len(failed) <= MOST_FAILURES:
        kept = list(lines)
    else:
        first = {line.page for line in lines[:FIRST_ROWS]}
        shown_failures = {line.page for line in failed[:MOST_FAILURES]}
        kept = [line for line in lines if line.page in first | shown_failures]
    rows = [row(line) for line in kept]
    shown = {line.page for line in kept}
    left_out = Counter(line.status for line in lines if line.page not in shown)
    if left_out:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(left_out.items()))
        rows.append(
            {
                **dict.fromkeys(COLUMNS, ""),
                "page": "...",
                "status": f"{sum(left_out.values())} more",
                "answer": f"{counts}; all pages: {show_command}",
            }
        )
    return rows


def row(line: PageLine) -> dict[str, Any]:
    """One page as the table shows it: the answer's start, or the error of a failed page."""
    text = line.output if line.status == "ok" else (line.error or line.output or "")
    return {
        "page": line.page,
        "status": line.status,
        "tokens in": _or_dash(line.tokens_in),
        "tokens out": _or_dash(line.tokens_out),
        "model s": "-" if line.model_seconds is None else f"{line.model_seconds:.2f}",
        "peak memory": peak_memory(line.peak_vram_bytes, line.peak_rss_bytes),
        "attempts": line.attempts,
        "answer": _shorten(text or ""),
    }


def peak_memory(vram_bytes: int | None, rss_bytes: int | None) -> str:
    """Torch's peak on a GPU; on a CPU, where there is none, the process's RSS."""
    if vram_bytes is not None:
        return f"{vram_bytes / 2**20:,.1f} MiB VRAM"
    return "-" if rss_bytes is None else f"{rss_bytes / 2**20:,.0f} MiB RSS"


def _shorten(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= ANSWER_CHARS else flat[: ANSWER_CHARS - 1] + "…"


def _or_dash(value: int | None) -> Any:
    return "-" if value is None else value
