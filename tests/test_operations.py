"""The operations side without a server: which documents the sweep and the retry flow pick, and
prefect.yaml against the deployments `vramflow serve` creates."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from prefect.logging import disable_run_logger
from sqlalchemy import update

from tests.support.servers import clean_env
from vramflow.config import Settings
from vramflow.db import maintenance, queries
from vramflow.db.models import Result
from vramflow.db.schema import ensure_schema
from vramflow.db.session import dispose_engines, session_scope
from vramflow.runs import generation_settings_json, key_parts

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'vramflow.db'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    ensure_schema(url)
    yield url
    dispose_engines()


def _settings(url: str, **values) -> Settings:
    return Settings(**{"database_url": url, "model": "tiny", "prompt": "Summarise.", **values})


def _document(url: str, sha: str, status: str, pages: dict[int, str], **values) -> int:
    with session_scope(url) as session:
        document_id = queries.record_document(
            session,
            sha256=sha,
            path=values.pop("path", f"/in/{sha[:4]}.pdf"),
            file_name=f"{sha[:4]}.pdf",
            size_bytes=1,
            status=status,
            **values,
        )
        for number, page_status in pages.items():
            queries.record_page(session, document_id, page_number=number, status=page_status)
    return document_id


def _results(url: str, settings: Settings, document_id: int, statuses: dict[int, str], run=None):
    key = queries.ResultKey(document_id, *key_parts(settings))
    with session_scope(url) as session:
        ids = queries.start_results(
            session, key, list(statuses), settings.prompt, generation_settings_json(settings), run
        )
        for page, status in statuses.items():
            if status != "running":
                queries.finish_result(session, ids[page], status=status, attempts=1)
    return key


def test_a_document_is_processed_only_under_the_key_that_finished_it(url):
    settings = _settings(url)
    done = _document(url, "a" * 64, "done", {1: "ok", 2: "ok", 3: "no_text"})
    _results(url, settings, done, {1: "ok", 2: "failed"})
    half = _document(url, "b" * 64, "done", {1: "ok", 2: "ok"})
    _results(url, settings, half, {1: "ok"})  # a run limited to page 1
    _document(url, "c" * 64, "running", {1: "ok"})
    blank = _document(url, "d" * 64, "done", {1: "no_text"})
    with session_scope(url) as session:

        def known(sha: str, s: Settings = settings) -> bool:
            return maintenance.processed_document(session, sha, *key_parts(s)) is not None

        assert known("a" * 64)
        assert not known("a" * 64, _settings(url, max_new_tokens=7))
        assert not known("a" * 64, _settings(url, prompt="Other."))
        assert not known("b" * 64)
        assert not known("c" * 64)
        assert known("d" * 64) and blank
        assert not known("e" * 64)


def test_failed_stuck_and_partial_results_become_one_job_per_document_and_key(url):
    settings, other = _settings(url), _settings(url, prompt="Other.")
    first = _document(url, "a" * 64, "partial", {1: "ok", 2: "ok", 3: "ok"}, path="/in/a.pdf")
    _results(url, settings, first, {1: "ok", 2: "failed", 3: "running"}, run="run-1")
    _results(url, other, first, {1: "failed"})
    second = _document(url, "b" * 64, "partial", {1: "ok", 2: "failed"})
    _results(url, settings, second, {1: "ok"})
    fresh = _document(url, "c" * 64, "running", {1: "ok"})
    _results(url, settings, fresh, {1: "running"}, run="run-2")
    hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    with session_scope(url) as session:
        session.execute(
            update(Result)
            .where(Result.document_id == first, Result.status == "running")
            .values(updated_at=hour_ago - timedelta(minutes=1))
        )
        failed = maintenance.failed_results(session, max_attempts=5)
        assert maintenance.failed_results(session, max_attempts=1) == []
        stuck = maintenance.stuck_results(session, hour_ago)
        partial = maintenance.partial_documents(session)
        jobs = maintenance.retry_jobs(session, failed + stuck + partial)
    assert [(r.document_id, r.page_number) for r in stuck] == [(first, 3)]
    assert stuck[0].flow_run_id == "run-1"
    by_key = {(j.document_id, j.prompt): j for j in jobs}
    assert set(by_key) == {(first, "Summarise."), (first, "Other."), (second, "Summarise.")}
    assert by_key[first, "Summarise."].pages == (2, 3)
    assert by_key[first, "Summarise."].reasons == ("failed", "running")
    # a partial document is run again under the key of its newest result
    assert by_key[first, "Other."].reasons == ("failed", "partial")
    assert by_key[first, "Summarise."].path == "/in/a.pdf"
    assert by_key[first, "Summarise."].settings["max_new_tokens"] == settings.max_new_tokens
    assert by_key[second, "Summarise."].pages == ()
    assert by_key[second, "Summarise."].reasons == ("partial",)


def test_scan_inbox_tells_new_known_renamed_and_duplicate_files_apart(tmp_path):
    from vramflow.tasks.inbox import scan_inbox

    url = f"sqlite:///{tmp_path / 'vramflow.db'}"
    settings, inbox = _settings(url), tmp_path / "inbox"
    inbox.mkdir()
    for name, body in [("a.pdf", b"%PDF-a"), ("b.PDF", b"%PDF-b"), ("c.pdf", b"%PDF-b")]:
        (inbox / name).write_bytes(body)
    (inbox / "notes.txt").write_text("ignored")
    (inbox / "copying.pdf.part").write_bytes(b"%PDF-partial")
    from vramflow.pdf import file_sha256

    ensure_schema(url)
    known = _document(url, file_sha256(inbox / "a.pdf"), "done", {1: "ok"})
    _results(url, settings, known, {1: "ok"})
    shutil.copy(inbox / "a.pdf", inbox / "renamed.pdf")
    (inbox / "zero.pdf").write_bytes(b"")
    with session_scope(url) as session:
        queries.record_document(
            session,
            sha256=file_sha256(inbox / "zero.pdf"),
            path=str(inbox / "zero.pdf"),
            file_name="zero.pdf",
            size_bytes=0,
            status="failed",
            error_type="NotAPdfError",
            error_message="empty (0 bytes)",
        )
    with disable_run_logger():
        found = scan_inbox.fn(str(inbox), settings)
    dispose_engines()
    assert [(f.name, f.status) for f in found] == [
        ("a.pdf", "known"),
        ("b.PDF", "new"),
        ("c.pdf", "duplicate"),
        ("renamed.pdf", "known"),
        ("zero.pdf", "unreadable"),
    ]
    assert "NotAPdfError" in found[-1].detail


def test_retry_planning_refuses_what_process_pdf_could_not_redo(tmp_path):
    from vramflow.tasks.retries import _why_not

    url = f"sqlite:///{tmp_path / 'vramflow.db'}"
    settings, pdf = _settings(url), tmp_path / "a.pdf"
    pdf.write_bytes(b"%PDF-a")
    ensure_schema(url)
    document_id = _document(url, "a" * 64, "partial", {1: "ok"}, path=str(pdf))
    _results(url, settings, document_id, {1: "failed"})
    with session_scope(url) as session:
        [job] = maintenance.retry_jobs(session, maintenance.failed_results(session, 5))
    dispose_engines()
    assert _why_not(job, settings) is None
    # The stored generation settings travel with the retry, whatever the worker's defaults.
    assert _why_not(job, _settings(url, max_input_tokens=99)) is None
    unknown = job.__class__(**{**job.__dict__, "settings_hash": "0" * 64})
    assert "cannot be reproduced" in _why_not(unknown, settings)
    assert "encrypted" in _why_not(job.__class__(**{**job.__dict__, "encrypted": True}), settings)
    pdf.unlink()
    assert "file gone" in _why_not(job, settings)


# -- prefect.yaml and `vramflow serve` ------------------------------------------------------


def _prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_prefect_yaml_and_served_deployments_agree():
    from vramflow.flows.deployments import deployments

    declared = {d["name"]: d for d in _prefect_yaml()["deployments"]}
    served = {d.name: d for d in deployments()}
    assert set(declared) == set(served) == {"process-pdf", "sweep-inbox", "retry-failed"}
    for name, spec in declared.items():
        runner = served[name]
        # By module, not file: GPU workers unpickle the flow of a batch's run context by name,
        # and workers import it from the installed package.
        assert spec["entrypoint"] == runner.entrypoint
        assert runner.entrypoint.startswith("vramflow.flows.")
        assert spec["work_pool"]["name"] == "vramflow-gpu"
        schedules = [
            (s.schedule.cron, s.schedule.timezone, s.active, s.slug) for s in runner.schedules or []
        ]
        assert schedules == [
            (s["cron"], s["timezone"], s.get("active", True), s["slug"]) for s in spec["schedules"]
        ]
        limit = spec.get("concurrency_limit") or {}
        assert limit.get("limit") == runner.concurrency_limit
        options = runner.concurrency_options
        assert limit.get("collision_strategy") == (options and options.collision_strategy.value)
    assert served["retry-failed"].schedules[0].active is False


def test_deployments_leave_the_generation_settings_to_the_workers():
    """Pinned in the yaml, a value would override the worker's VRAMFLOW_* setting on every
    run; a value pinned on purpose must at least be one both flows accept."""
    from vramflow.flows.process_pdf import process_pdf
    from vramflow.flows.sweep_inbox import sweep_inbox

    yaml_file = _prefect_yaml()
    generation = yaml_file["definitions"]["parameters"]["generation"]
    assert generation == {}
    for deployment in yaml_file["deployments"][:2]:
        assert deployment["parameters"] == generation
    for flow in (process_pdf, sweep_inbox):
        assert set(generation) <= set(inspect.signature(flow.fn).parameters)


def test_serve_refuses_without_a_prefect_server(tmp_path):
    """The temporary server runs no schedules: serving against it would silently do nothing."""
    command = "import sys; from vramflow.cli import main; sys.argv[0] = 'vramflow'; main()"
    env = clean_env(PREFECT_HOME=str(tmp_path), VRAMFLOW_HOME=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", command, "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "needs a Prefect server" in done.stderr


def test_flow_processes_import_neither_torch_nor_transformers():
    """Flow runs send their pages to GPU workers: loading their modules must not load torch."""
    import subprocess
    import sys

    code = (
        "import sys, vramflow.flows.process_pdf, vramflow.flows.sweep_inbox,"
        " vramflow.flows.retry_failed, vramflow.flows.deployments;"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stderr
