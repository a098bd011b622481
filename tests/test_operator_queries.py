"""The queries behind the run report, `vramflow plot` and `vramflow status`, on both backends."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.test_operator_cli import RUN, SLOT, seed
from vramflow.db import run_views, status, workers
from vramflow.db.models import Document
from vramflow.db.queries import ResultKey
from vramflow.db.session import dispose_engines, session_scope

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'vramflow.db'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    seed(url)
    yield url
    dispose_engines()


def test_page_lines_sum_up_each_pages_model_calls(url):
    with session_scope(url) as session:
        document_id = session.scalar(select(Document.id))
        lines = run_views.page_lines(session, ResultKey(document_id, "model", "p" * 64, "s" * 64))
    assert [(line.page, line.status) for line in lines] == [
        (1, "ok"),
        (2, "ok"),
        (3, "ok"),
        (4, "ok"),
        (5, "running"),
        (6, "running"),
    ]
    assert [line.attempts for line in lines] == [2, 2, 2, 2, 0, 0]  # the OOM call, then the ok one
    assert lines[0].peak_vram_bytes == 900 * 2**20 and lines[4].peak_vram_bytes is None


def test_timeline_has_one_entry_per_model_call_and_the_open_hold(url):
    with session_scope(url) as session:
        timeline = run_views.timeline(session, RUN, title="a.pdf")
        assert run_views.latest_flow_run(session) == RUN
        later = run_views.timeline(session, since=timeline.calls[-1].started_at)
    assert [(c.outcome, c.pages) for c in timeline.calls] == [("oom", 4), ("ok", 2), ("ok", 2)]
    assert timeline.on_gpu and timeline.calls[0].nvml_total_bytes == 8 * 2**30
    [hold] = timeline.holds
    assert (hold.slot_name, hold.released_at) == (SLOT, None)
    assert timeline.start.tzinfo is not None and timeline.start == hold.acquired_at
    assert [c.outcome for c in later.calls] == ["ok"]


def test_status_queries_see_the_holder_the_queue_and_the_last_minutes(url):
    with session_scope(url) as session:
        [holder] = status.open_holds(session)
        queue = status.queue(session)
        recent = status.throughput(session, minutes=5)
        before = status.throughput(session, minutes=5, now=holder.acquired_at - timedelta(1))
        assert status.gpu_workers(session) == []
        workers.register(session, "worker-1", "hosta", 4343, "cuda:0", "gpu-worker")
        workers.register(session, "worker-2", "hosta", 4344, "cuda:1", "gpu-worker")
        workers.stopped(session, "worker-2")
        session.flush()
        [alive] = status.gpu_workers(session)
        assert (alive.worker_id, alive.pid, alive.device) == ("worker-1", 4343, "cuda:0")
    assert (holder.host, holder.pid) == ("hosta", 4242)
    assert (queue.running, queue.pending) == (2, 0) and queue.oldest_since is not None
    assert (recent.pages, recent.calls_ok, recent.calls_oom, recent.tokens_out) == (4, 2, 1, 32)
    assert recent.pages_per_second == pytest.approx(4 / 300)
    assert before.pages == 0


def test_page_lines_count_only_the_calls_of_the_run_that_made_the_result(url):
    """A forced re-run made page 1's result again: its figures are that run's, none yet."""
    from sqlalchemy import update

    from vramflow.db.models import Result

    with session_scope(url) as session:
        session.execute(update(Result).where(Result.page_number == 1).values(flow_run_id="again"))
    with session_scope(url) as session:
        document_id = session.scalar(select(Document.id))
        lines = run_views.page_lines(session, ResultKey(document_id, "model", "p" * 64, "s" * 64))
    assert [line.attempts for line in lines[:2]] == [0, 2]
    assert lines[0].peak_vram_bytes is None and lines[1].peak_vram_bytes == 900 * 2**20


def test_a_runs_timeline_takes_holds_for_no_run_during_its_calls_but_not_other_runs(url):
    """A GPU worker holds the slot for several runs at once; another run's hold is not ours."""
    from vramflow.db import queries

    with session_scope(url) as session:
        timeline = run_views.timeline(session, RUN)
        during = timeline.calls[1].started_at
        for hold_id, run, at in [
            ("worker", None, during),
            ("other-run", "another", during),
            ("worker-later", None, during + timedelta(hours=1)),
        ]:
            queries.record_hold(
                session,
                hold_id=hold_id,
                slot_name=SLOT,
                device="cuda:0",
                host="hosta",
                pid=1,
                flow_run_id=run,
                pages=2,
                wait_seconds=0.0,
                acquired_at=at,
                released_at=at + timedelta(seconds=1),
            )
    with session_scope(url) as session:
        holds = run_views.timeline(session, RUN).holds
    assert sorted(h.pages for h in holds) == [2, 4]  # the worker's during the run, and ours
