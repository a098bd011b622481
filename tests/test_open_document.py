"""The open-document task: what it reads, and what it records, before a document is accepted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger
from sqlalchemy import func, select

from vramflow.config import Settings
from vramflow.db.models import Document
from vramflow.db.session import session_scope
from vramflow.errors import DocumentError, LimitExceededError
from vramflow.tasks.documents import open_document

DEMO = Path(__file__).resolve().parents[1] / "vramflow" / "demo" / "demo.pdf"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


def test_a_huge_sparse_file_is_refused_before_it_is_hashed(tmp_path: Path, settings: Settings):
    """20 GiB took 48 s of hashing before its size was checked; now only its size is read."""
    path = tmp_path / "huge.pdf"
    with open(path, "wb") as handle:
        handle.write(b"%PDF-1.7\n")
        handle.truncate(20 * 2**30)
    started = time.perf_counter()
    with disable_run_logger():
        opened = open_document.fn(str(path), None, settings)
    assert time.perf_counter() - started < 2
    assert isinstance(opened.error, LimitExceededError)
    assert "more than the limit of" in str(opened.error)
    with pytest.raises(LimitExceededError):
        opened.unwrap()


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_directory_or_a_fifo_is_not_called_missing(tmp_path: Path, settings: Settings, kind):
    path = tmp_path / "x.pdf"
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    with disable_run_logger():
        opened = open_document.fn(str(path), None, settings)
    assert isinstance(opened.error, DocumentError)
    assert "no such file" not in str(opened.error)
    assert ("directory" if kind == "directory" else "named pipe (FIFO)") in str(opened.error)


def test_a_readable_document_is_recorded_running(settings: Settings):
    with disable_run_logger():
        opened = open_document.fn(str(DEMO), None, settings)
    document_id, pages = opened.unwrap()
    assert pages == 6
    with session_scope(settings.resolved_database_url) as session:
        assert session.scalar(select(func.count(Document.id))) == 1
        assert session.get(Document, document_id).status == "running"


def test_the_inbox_sweep_does_not_hash_a_file_over_the_size_limit(tmp_path, settings):
    from vramflow.tasks.inbox import scan_inbox

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with open(inbox / "huge.pdf", "wb") as handle:
        handle.truncate(20 * 2**30)
    started = time.perf_counter()
    with disable_run_logger():
        [found] = scan_inbox.fn(str(inbox), settings)
    assert time.perf_counter() - started < 2
    assert found.status == "unreadable" and "more than the limit" in found.detail


def test_a_wrong_password_leaves_a_finished_document_as_it_was(tmp_path, settings):
    from pydantic import SecretStr
    from pypdf import PdfWriter

    from vramflow.db import queries
    from vramflow.db.schema import ensure_schema
    from vramflow.pdf import file_sha256

    locked = tmp_path / "locked.pdf"
    writer = PdfWriter(clone_from=DEMO)
    writer.encrypt(user_password="right", algorithm="AES-256")
    with open(locked, "wb") as handle:
        writer.write(handle)
    url = settings.resolved_database_url
    ensure_schema(url)
    with session_scope(url) as session:
        document_id = queries.record_document(
            session,
            sha256=file_sha256(locked),
            path=str(locked),
            file_name=locked.name,
            size_bytes=locked.stat().st_size,
            page_count=6,
            encrypted=True,
            status="done",
        )
    with disable_run_logger():
        opened = open_document.fn(str(locked), SecretStr("wrong"), settings)
    assert "wrong password" in str(opened.error)
    with session_scope(url) as session:
        document = session.get(Document, document_id)
        assert (document.status, document.error_message) == ("done", None)
