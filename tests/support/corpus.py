"""The sample PDF corpus beside the repository (../shared/corpus) and its MANIFEST."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest


def _corpus_dir() -> Path | None:
    beside_repo = Path(__file__).resolve().parents[3] / "shared" / "corpus"
    if beside_repo.is_dir():
        return beside_repo
    configured = os.environ.get("VRAMFLOW_CORPUS")
    return Path(configured) if configured and Path(configured).is_dir() else None


CORPUS = _corpus_dir()
needs_corpus = pytest.mark.skipif(CORPUS is None, reason="sample PDF corpus not found")


def manifest_rows() -> list[dict[str, str]]:
    if CORPUS is None:
        return []
    with open(CORPUS / "MANIFEST.tsv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def row_password(row: dict[str, str]) -> str | None:
    """The MANIFEST's password column: empty, or an empty user password, mean none."""
    return row["password"] if row["password"] not in ("", "(empty user pw)") else None
