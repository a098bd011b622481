"""What a flow run shows in the Prefect UI: a progress artifact and a summary table.

Async, for the async `process-pdf` flow: Prefect's artifact functions called in an async flow
return coroutines, so the flow awaits the async forms directly.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from vramflow import progress

# The artifact is updated at most this often (and once at the end). An update is a request to
# the Prefect API taking 10-80 ms in the flow's loop, which refills the batches in flight: with
# batches faster than that, an update per batch would leave the GPU waiting for work.
UPDATE_EVERY_SECONDS = 1.0


class ProgressReport:
    """A progress artifact for one document, also published to in-process listeners."""

    def __init__(self, document: str, planned: int, artifact_id: UUID) -> None:
        self.document, self.planned, self.finished = document, planned, 0
        self.artifact_id = artifact_id
        self._shown, self._shown_at = 0, time.monotonic()

    @classmethod
    async def start(cls, document: str, planned: int) -> ProgressReport:
        """Create the artifact at 0 % and tell the listeners."""
        artifact_id = await acreate_progress_artifact(
            progress=0.0, description=f"Pages of {document} through the model"
        )
        progress.publish(document, 0, planned)
        return cls(document, planned, artifact_id)

    async def advance(self, pages: int) -> None:
        """Count `pages` as finished; the artifact shows it if its last update is old enough."""
        self.finished += pages
        progress.publish(self.document, self.finished, self.planned)
        if time.monotonic() - self._shown_at >= UPDATE_EVERY_SECONDS:
            await self._show()

    async def close(self) -> None:
        """Bring the artifact up to date, if it is not."""
        if self._shown != self.finished or not self.planned:
            await self._show()

    async def _show(self) -> None:
        share = 100.0 * self.finished / self.planned if self.planned else 100.0
        self._shown, self._shown_at = self.finished, time.monotonic()
        await aupdate_progress_artifact(self.artifact_id, progress=share)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


async def publish_summary(summary: dict[str, Any], sha256: str) -> None:
    """A summary table (one row per figure) keyed by document, so runs of it line up."""
    rows = [
        {"figure": "status", "value": summary["status"]},
        {"figure": "pages ok", "value": summary["pages_ok"]},
        {"figure": "pages failed", "value": summary["pages_failed"]},
        {"figure": "pages without text", "value": summary["pages_no_text"]},
        {"figure": "pages already done", "value": summary["pages_already_done"]},
        {"figure": "p50 page latency", "value": _secs(summary["p50_page_seconds"])},
        {"figure": "p95 page latency", "value": _secs(summary["p95_page_seconds"])},
        {"figure": "peak VRAM (torch)", "value": _mib(summary["peak_vram_bytes"])},
        {"figure": "peak RSS", "value": _mib(summary["peak_rss_bytes"])},
        {"figure": "waiting for the GPU slot", "value": _secs(summary["slot_wait_seconds"])},
        {"figure": "OOM retries", "value": summary["oom_attempts"]},
    ]
    await acreate_table_artifact(
        table=rows,
        key=f"vramflow-summary-{sha256[:16]}",
        description=f"vramflow summary for {summary['file']}",
    )
    if summary.get("errors"):
        lines = "\n".join(f"- page {p}: {e}" for p, e in summary["errors"][:50])
        await acreate_markdown_artifact(
            markdown=f"## Page errors\n{lines}", description=f"Page errors of {summary['file']}"
        )
