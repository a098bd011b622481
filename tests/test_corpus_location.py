"""Where tests look for the sample corpus, and which tests may skip without it."""

from __future__ import annotations

from pathlib import Path

from tests import test_deployments_e2e
from tests.support.corpus import find_corpus


def test_the_skip_reason_says_where_it_looked_and_names_the_variable(tmp_path: Path):
    beside = tmp_path / "shared" / "corpus"
    corpus, reason = find_corpus({}, beside)
    assert corpus is None
    assert str(beside) in reason and "VRAMFLOW_CORPUS" in reason
    elsewhere = tmp_path / "elsewhere"
    corpus, reason = find_corpus({"VRAMFLOW_CORPUS": str(elsewhere)}, beside)
    assert corpus is None and str(elsewhere) in reason and str(beside) in reason


def test_the_variable_wins_over_the_folder_beside_the_repository(tmp_path: Path):
    for folder in (tmp_path / "mine", tmp_path / "beside"):
        folder.mkdir()
        (folder / "MANIFEST.tsv").write_text("file\n")
    corpus, _ = find_corpus({"VRAMFLOW_CORPUS": str(tmp_path / "mine")}, tmp_path / "beside")
    assert corpus == tmp_path / "mine"


def test_the_deployment_tests_run_on_a_fresh_clone():
    """They make their own PDFs: nothing about the corpus may skip them."""
    marks = test_deployments_e2e.pytestmark
    assert all(mark.name != "skipif" for mark in marks), marks
