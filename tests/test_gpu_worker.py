"""`vramflow gpu-worker` against a real Prefect server: faults a resident worker must survive.

A flow run (`vramflow run` with PREFECT_API_URL set) sends its batches to GPU worker processes
through the server. Killing a worker mid-batch loses and repeats nothing once another starts; with
no worker at all, the run fails within the configured wait, with a message that says what to do.
The results database is SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import select

from tests.support.gpu_workers import FAST_HEALTH, start_gpu_worker, wait_until_serving
from tests.support.runs import make_pdfs, ok_attempts, start_run
from tests.support.servers import stop_process_group, tail
from vramflow.db.models import Result
from vramflow.db.session import dispose_engines, session_scope

pytestmark = pytest.mark.slow
PAGES = 8
RUN_ARGS = ("--max-new-tokens", "48", "--batch-size", "1")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("fresh_postgres_url")
    return f"sqlite:///{tmp_path / 'results.db'}"


@pytest.fixture
def env(prefect_server, database_url, tmp_path) -> dict[str, str]:
    return {
        **prefect_server.env,
        **FAST_HEALTH,
        "VRAMFLOW_HOME": str(tmp_path / "home"),
        "VRAMFLOW_DATABASE_URL": database_url,
        "VRAMFLOW_INFERENCE": "gpu-worker",
    }


def claimed_by(url: str, worker_id: str) -> list[int]:
    """Pages the worker holds as running."""
    with session_scope(url) as session:
        query = select(Result.page_number).where(
            Result.status == "running", Result.worker_id == worker_id
        )
        return sorted(session.scalars(query))


def wait_mid_document(url: str, run, worker_id: str, timeout: float = 300) -> list[int]:
    """Once some pages are answered and the worker holds others; returns the held pages."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, "the run ended before the worker could be killed"
        held = claimed_by(url, worker_id)
        if len(ok_attempts(url)) >= 2 and held:
            return held
        time.sleep(0.05)
    raise AssertionError(f"the worker held no pages mid-document within {timeout} s")


def test_kill_9_of_the_gpu_worker_mid_batch_loses_and_repeats_nothing(
    env, database_url, tiny_model_dir, tmp_path
):
    [pdf] = make_pdfs(tmp_path / "pdfs", count=1, pages=PAGES)
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "second", "run")}
    first = start_gpu_worker(env, tiny_model_dir, logs["first"])
    second = run = None
    try:
        first_id = wait_until_serving(database_url, first, logs["first"])
        run = start_run(pdf, tiny_model_dir, logs["run"], env, *RUN_ARGS)
        held = wait_mid_document(database_url, run, first_id)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        before = ok_attempts(database_url)
        assert held and len(before) < PAGES, "the kill should land mid-document"

        second = start_gpu_worker(env, tiny_model_dir, logs["second"])
        code = run.wait(timeout=300)
        assert code == 0, tail(logs["run"]) + tail(logs["second"])
    finally:
        for process in (first, second, run):
            if process is not None:
                stop_process_group(process)

    after = ok_attempts(database_url)
    assert sorted(after) == list(range(1, PAGES + 1))  # none lost
    assert all(count == 1 for count in after.values())  # none answered twice
    assert all(after[page] == 1 for page in before)
    with session_scope(database_url) as session:
        results = session.scalars(select(Result)).all()
        assert len(results) == PAGES and {r.status for r in results} == {"ok"}
        assert {r.worker_id for r in results} == {None}  # no claim left behind
    dispose_engines()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_without_a_gpu_worker_a_run_fails_in_time_saying_to_start_one(
    env, database_url, tiny_model_dir, tmp_path
):
    [pdf] = make_pdfs(tmp_path / "pdfs", count=1, pages=2)
    env = {**env, "VRAMFLOW_GPU_WORKER_WAIT_SECONDS": "3"}
    started = time.monotonic()
    run = start_run(pdf, tiny_model_dir, tmp_path / "run.log", env, *RUN_ARGS)
    try:
        code = run.wait(timeout=120)
    finally:
        stop_process_group(run)
    assert code == 1 and time.monotonic() - started < 90
    output = (tmp_path / "run.log").read_text()
    assert "vramflow gpu-worker" in output, output
    with session_scope(database_url) as session:
        results = session.scalars(select(Result).order_by(Result.page_number)).all()
    assert [(r.page_number, r.status, r.error_type) for r in results] == [
        (1, "failed", "NoGpuWorkerError"),
        (2, "failed", "NoGpuWorkerError"),
    ]
    assert "start one with `vramflow gpu-worker`" in results[0].error_message
    dispose_engines()
