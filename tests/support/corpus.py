"""The sample PDF corpus (`$VRAMFLOW_CORPUS`, else ../shared/corpus beside the repository).

Only tests about specific corpus files use it; everything else makes its PDFs
(`vramflow.demo.pdfgen`) or uses the shipped demo, so a fresh clone skips only these.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

import pytest

BESIDE_REPO = Path(__file__).resolve().parents[3] / "shared" / "corpus"


def find_corpus(environ: Mapping[str, str], beside: Path = BESIDE_REPO) -> tuple[Path | None, str]:
    """(the corpus folder or None, where it was looked for)."""
    configured = environ.get("VRAMFLOW_CORPUS")
    places = ([Path(configured)] if configured else []) + [beside]
    for place in places:
        if (place / "MANIFEST.tsv").is_file():
            return place, ""
    looked = " and ".join(str(p) for p in places)
    hint = "" if configured else "; set VRAMFLOW_CORPUS to the folder holding it"
    return None, f"sample PDF corpus (MANIFEST.tsv) not found in {looked}{hint}"


CORPUS, _WHERE = find_corpus(os.environ)
needs_corpus = pytest.mark.skipif(CORPUS is None, reason=_WHERE)


def manifest_rows() -> list[dict[str, str]]:
    if CORPUS is None:
        return []
    with open(CORPUS / "MANIFEST.tsv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def row_password(row: dict[str, str]) -> str | None:
    """The MANIFEST's password column: empty, or an empty user password, mean none."""
    return row["password"] if row["password"] not in ("", "(empty user pw)") else None
