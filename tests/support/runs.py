"""Start `vramflow run` in subprocesses, the way users and workers do."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy import func, select

from tests.support.servers import clean_env
from vramflow.db.models import Attempt, Result
from vramflow.db.session import session_scope


def start_run(
    pdf: Path, model_dir: Path, log_path: Path, env: Mapping[str, str], *args: str
) -> subprocess.Popen:
    """`python -m vramflow run PDF` in its own process group, output to `log_path`."""
    command = [sys.executable, "-m", "vramflow", "run", str(pdf), "--model", str(model_dir), *args]
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            env=clean_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def make_pdfs(folder: Path, count: int, pages: int) -> list[Path]:
    """`count` distinct PDFs of `pages` pages of prose each."""
    from vramflow.demo.make_demo import PAGES
    from vramflow.demo.pdfgen import write_text_pdf

    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_text_pdf(
            folder / f"doc{d}.pdf",
            [
                f"Document {d}, page {p}.\n{PAGES[(d + p) % len(PAGES)]}"
                for p in range(1, pages + 1)
            ],
        )
        for d in range(1, count + 1)
    ]


def ok_attempts(url: str) -> dict[int, int]:
    """page → number of successful model calls recorded for it."""
    with session_scope(url) as session:
        rows = session.execute(
            select(Result.page_number, func.count(Attempt.id))
            .join(Attempt, Attempt.result_id == Result.id)
            .where(Attempt.outcome == "ok")
            .group_by(Result.page_number)
        ).all()
    return dict(rows)
