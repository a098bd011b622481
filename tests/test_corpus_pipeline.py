"""The whole pipeline (tiny model) over every sample PDF: each file ends with the recorded
outcome its MANIFEST row predicts, and no file's failure touches another file's rows."""

from __future__ import annotations

import asyncio
import re

import pytest
from pydantic import SecretStr
from sqlalchemy import func, select

from tests.support.corpus import CORPUS, manifest_rows, needs_corpus, row_password
from vramflow.db.models import Document, Page, Result
from vramflow.db.session import session_scope

pytestmark = [needs_corpus, pytest.mark.slow]


def expected_outcome(row: dict[str, str]) -> str:
    outcome = row["pypdf_outcome"]
    if outcome.startswith(("OPEN_FAIL", "PAGES_FAIL")):
        return "failed"
    errors = re.match(r"PAGE_ERRORS (\d+)/(\d+)", outcome)
    if errors and "jbig2dec" not in outcome:
        return "failed" if errors.group(1) == errors.group(2) else "partial"
    return "done"


@pytest.fixture(scope="module")
def corpus_run(prefect_harness, tiny_model_dir, tmp_path_factory):
    """Process every file once, in MANIFEST order, into one shared database."""
    from vramflow.flows.process_pdf import process_pdf

    home = tmp_path_factory.mktemp("corpus-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("VRAMFLOW_HOME", str(home))
    patch.delenv("VRAMFLOW_DATABASE_URL", raising=False)
    outcomes: dict[str, object] = {}
    try:
        for row in manifest_rows():
            password = row_password(row)
            state = asyncio.run(
                process_pdf(
                    path=str(CORPUS / row["file"]),
                    password=SecretStr(password) if password is not None else None,
                    model=str(tiny_model_dir),
                    max_new_tokens=1,
                    batch_size=8,
                    return_state=True,
                )
            )
            # A document that could not be opened ends Failed without a summary.
            outcomes[row["file"]] = state.result(raise_on_failure=False)
    finally:
        patch.undo()
    return f"sqlite:///{home / 'vramflow.db'}", outcomes


@pytest.mark.parametrize("row", manifest_rows(), ids=lambda row: row["file"])
def test_file_outcome_matches_manifest(corpus_run, row):
    url, outcomes = corpus_run
    outcome = outcomes[row["file"]]
    with session_scope(url) as session:
        document = session.scalars(select(Document).where(Document.file_name == row["file"])).one()
        pages = dict(
            session.execute(
                select(Page.page_number, Page.status).where(Page.document_id == document.id)
            ).all()
        )
        results = dict(
            session.execute(
                select(Result.page_number, Result.status).where(Result.document_id == document.id)
            ).all()
        )
    expected = expected_outcome(row)
    if "jbig2dec" in row["pypdf_outcome"]:  # fails without the jbig2dec binary, not with it
        assert document.status in ("done", "failed")
    else:
        assert document.status == expected, document.error_message
    if expected == "failed" and not isinstance(outcome, dict):
        assert document.error_type and len(document.error_message) > 10
        assert not pages and not results
        return
    assert len(pages) == int(row["pages"])
    for number, status in pages.items():
        if status == "ok":
            assert results.get(number) == "ok"  # every page with text got an answer
        else:
            assert number not in results  # no text, or extraction failed: no inference
    no_text = re.search(r"(\d+) page\(s\) with no text", row["pypdf_outcome"])
    assert list(pages.values()).count("no_text") == (int(no_text.group(1)) if no_text else 0)


def test_every_file_has_exactly_one_document_row(corpus_run):
    url, _ = corpus_run
    with session_scope(url) as session:
        names = session.scalars(select(Document.file_name)).all()
        duplicates = session.scalar(
            select(func.count()).select_from(
                select(Result.document_id, Result.page_number)
                .group_by(Result.document_id, Result.page_number)
                .having(func.count() > 1)
                .subquery()
            )
        )
    # The truncated GeoTopo copy has different bytes, so it is a document of its own.
    assert sorted(names) == sorted(row["file"] for row in manifest_rows())
    assert duplicates == 0
