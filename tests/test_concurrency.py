"""The GPU slot's guarantee, measured: one model call per device across concurrent processes.

Four `vramflow run` processes start together against one Prefect server and one database; the
stored call intervals must never overlap. A control runs the naive asyncio loop (model calls in
threads) through the same measurement and must overlap, so the check is known to catch a
broken slot.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from tests.support.intervals import max_concurrency, stored_call_intervals, stored_hold_intervals
from tests.support.runs import make_pdfs, start_run
from tests.support.servers import stop_process_group, tail
from vramflow.db.models import Result
from vramflow.db.session import session_scope

pytestmark = pytest.mark.slow


def test_four_processes_never_overlap_on_the_device(prefect_server, tiny_model_dir, tmp_path):
    pdfs = make_pdfs(tmp_path / "pdfs", count=4, pages=6)
    home = tmp_path / "home"
    env = {**prefect_server.env, "VRAMFLOW_HOME": str(home)}
    logs = [tmp_path / f"run{i}.log" for i in range(4)]
    runs = [
        start_run(pdf, tiny_model_dir, log, env, "--max-new-tokens", "16", "--batch-size", "2")
        for pdf, log in zip(pdfs, logs, strict=True)
    ]
    try:
        codes = [run.wait(timeout=400) for run in runs]
    finally:
        for run in runs:
            stop_process_group(run)
    assert codes == [0, 0, 0, 0], "\n".join(tail(log) for log in logs)

    url = f"sqlite:///{home / 'vramflow.db'}"
    with session_scope(url) as session:
        ok = session.scalar(select(func.count(Result.id)).where(Result.status == "ok"))
        runs_seen = session.scalar(select(func.count(func.distinct(Result.flow_run_id))))
    assert ok == 24 and runs_seen == 4
    calls = stored_call_intervals(url)
    assert set(calls) == {"cpu"} and len(calls["cpu"]) >= 12
    assert max_concurrency(calls["cpu"]) == 1
    assert max_concurrency(stored_hold_intervals(url)) == 1  # weights resident one at a time


def test_control_naive_async_loop_overlaps(tiny_model_dir, tmp_path):
    """The classic bug: asyncio.gather over pages, each model call in a thread."""
    from vramflow import models
    from vramflow.inference import GenerationSettings, PageInput, run_batch

    loaded = models.load_model(str(tiny_model_dir), tmp_path)
    cfg = GenerationSettings("Summarise.", "cpu", 16, 256, 60.0)
    records = []

    async def page(number: int) -> None:
        await asyncio.to_thread(
            run_batch,
            loaded,
            [PageInput(number, f"page {number} " * 50)],
            cfg,
            on_call=records.append,
        )

    async def main() -> None:
        await asyncio.gather(*(page(n) for n in range(1, 7)))

    asyncio.run(main())
    assert len(records) == 6
    assert max_concurrency((r.started_at, r.finished_at) for r in records) > 1
