"""Crash recovery: SIGKILL `vramflow run` mid-document, run again, lose and repeat nothing.

Runs against a real Prefect server (filesystem lease storage, 60 s leases): the second run
gets the dead holder's slot back from its on-disk holder record at once, or, if the kill
landed between the grant and the record, when the lease expires. On SQLite and PostgreSQL.
(Prefect's temporary server never expires leases: there, a kill inside that window leaks the
slot; tests/test_gpu_slot.py covers its dead-holder recovery.)
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import select

from tests.support.runs import make_pdfs, ok_attempts, start_run
from tests.support.servers import stop_process_group, tail
from vramflow.db.models import Result
from vramflow.db.session import dispose_engines, session_scope

pytestmark = pytest.mark.slow
PAGES = 12


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("fresh_postgres_url")
    return f"sqlite:///{tmp_path / 'crash.db'}"


def wait_for_ok_pages(url: str, process, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        try:
            if len(ok_attempts(url)) >= count:
                return
        except Exception:  # tables not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} pages done within {timeout} s")


def test_sigkill_mid_document_then_rerun_completes(
    database_url, prefect_server, tiny_model_dir, tmp_path
):
    [pdf] = make_pdfs(tmp_path / "pdfs", count=1, pages=PAGES)
    env = {
        **prefect_server.env,
        "VRAMFLOW_HOME": str(tmp_path / "home"),
        "VRAMFLOW_DATABASE_URL": database_url,
    }
    args = ("--max-new-tokens", "48", "--batch-size", "1")
    first = start_run(pdf, tiny_model_dir, tmp_path / "first.log", env, *args)
    try:
        wait_for_ok_pages(database_url, first, 3)
        os.killpg(first.pid, signal.SIGKILL)  # the run and its PDF workers
        first.wait(timeout=30)
    finally:
        stop_process_group(first)
    before = ok_attempts(database_url)
    assert 3 <= len(before) < PAGES, "the kill should land mid-document"

    second = start_run(pdf, tiny_model_dir, tmp_path / "second.log", env, *args)
    try:
        code = second.wait(timeout=400)
    finally:
        stop_process_group(second)
    assert code == 0, tail(tmp_path / "second.log")

    after = ok_attempts(database_url)
    assert sorted(after) == list(range(1, PAGES + 1))
    assert all(after[page] == before[page] == 1 for page in before)  # not inferred again
    with session_scope(database_url) as session:
        results = session.scalars(select(Result)).all()
    assert len(results) == PAGES and {r.status for r in results} == {"ok"}
    dispose_engines()
