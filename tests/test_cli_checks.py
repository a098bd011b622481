"""`vramflow run` refuses a bad command line before anything starts; `show` picks one result set.

These run the real command in a subprocess, without Prefect's server or a model.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import typer.main
from sqlalchemy import update

from vramflow.cli import app
from vramflow.config import Settings
from vramflow.db import queries
from vramflow.db.models import Document, Result, utcnow
from vramflow.db.schema import ensure_schema
from vramflow.db.session import dispose_engines, session_scope
from vramflow.pdf import file_sha256

DEMO = Path(__file__).resolve().parents[1] / "vramflow" / "demo" / "demo.pdf"
# Refusing takes a Python start and a few imports (about 0.3 s here); far below the 13-16 s
# Prefect's temporary server took to start before a bad command line was noticed.
REFUSE_WITHIN_S = 5


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def env(tmp_path: Path, home: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VRAMFLOW_", "PREFECT_"))}
    return {**clean, "VRAMFLOW_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect")}


def vramflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vramflow", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def database(home: Path) -> str:
    return Settings(home=home).resolved_database_url


def record_done_demo(home: Path) -> int:
    url = database(home)
    ensure_schema(url)
    with session_scope(url) as session:
        return queries.record_document(
            session,
            sha256=file_sha256(DEMO),
            path=str(DEMO),
            file_name=DEMO.name,
            size_bytes=DEMO.stat().st_size,
            page_count=6,
            status="done",
        )


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--pages", "9-3"], "bad page range '9-3'", 2),
        (["--pages", "1-2;5"], "bad page range", 2),
        (["--prompt", "   "], "the prompt is empty", 2),
        (["--batch-size", "0"], "invalid settings: batch_size", 2),
        (["--max-input-tokens", "1"], "invalid settings: max_input_tokens", 2),
    ],
)
def test_a_refused_run_changes_nothing_and_starts_nothing(env, home, tmp_path, args, message, code):
    document_id = record_done_demo(home)
    started = time.perf_counter()
    done = vramflow("run", str(DEMO), *args, env=env)
    elapsed = time.perf_counter() - started
    assert done.returncode == code, done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert elapsed < REFUSE_WITHIN_S
    assert not (tmp_path / "prefect").exists(), "Prefect's temporary server was started"
    with session_scope(database(home)) as session:
        assert session.get(Document, document_id).status == "done"
    dispose_engines()


def test_bad_files_are_refused_one_line_each_before_anything_runs(env, tmp_path):
    os.mkfifo(tmp_path / "pipe.pdf")
    (tmp_path / "loop.pdf").symlink_to(tmp_path / "loop.pdf")
    (tmp_path / "notes.pdf").write_text("not a pdf")
    (tmp_path / "folder.pdf").mkdir()
    names = ["missing.pdf", "pipe.pdf", "loop.pdf", "notes.pdf", "folder.pdf"]
    started = time.perf_counter()
    done = vramflow("run", str(DEMO), *(str(tmp_path / n) for n in names), env=env)
    assert done.returncode == 1 and time.perf_counter() - started < REFUSE_WITHIN_S
    lines = done.stderr.splitlines()
    assert "Traceback" not in done.stderr and len(lines) == len(names), done.stderr
    expected = [
        "missing.pdf: no such file",
        "pipe.pdf is a named pipe (FIFO), not a PDF file",
        "loop.pdf: symbolic link loop",
        "notes.pdf is not a PDF (no %PDF- header",
        "folder.pdf is a directory, not a PDF file",
    ]
    for line, text in zip(lines, expected, strict=True):
        assert line.startswith("error: ") and text in line
    assert not (tmp_path / "prefect").exists()


def test_run_has_an_option_for_every_parameter_of_the_flow():
    from vramflow.flows.process_pdf import process_pdf

    command = typer.main.get_command(app).commands["run"]
    options = {p.name for p in command.params}
    wanted = set(inspect.signature(process_pdf.fn).parameters) - {"path", "password_secret"}
    assert wanted <= options | {"path"}, wanted - options


def test_flow_parameters_that_are_settings_default_to_the_settings():
    """A concrete default would override VRAMFLOW_MODEL and the like on every run."""
    from vramflow.flows.process_pdf import process_pdf
    from vramflow.flows.sweep_inbox import sweep_inbox

    for flow in (process_pdf, sweep_inbox):
        for name, parameter in inspect.signature(flow.fn).parameters.items():
            if name in Settings.model_fields:
                assert parameter.default is None, f"{flow.name}: {name}"


# -- show ------------------------------------------------------------------------------------


def _results(url: str, document_id: int, model: str, prompt: str, pages: dict[int, str]) -> None:
    from vramflow.runs import generation_settings_json, key_parts

    settings = Settings(model=model, prompt=prompt)
    key = queries.ResultKey(document_id, *key_parts(settings))
    with session_scope(url) as session:
        ids = queries.start_results(
            session, key, list(pages), prompt, generation_settings_json(settings), "run"
        )
        for page, status in pages.items():
            if status == "ok":
                queries.finish_result(session, ids[page], status="ok", output=f"{model} {page}")


def test_show_prints_one_model_and_prompt_at_a_time(env, home):
    document_id = record_done_demo(home)
    url = database(home)
    _results(url, document_id, "other-model", "Translate.", {1: "running", 2: "ok"})
    with session_scope(url) as session:  # an hour older than the set written next
        session.execute(update(Result).values(updated_at=utcnow() - timedelta(hours=1)))
    _results(url, document_id, "smol", "Summarise.", {1: "ok", 2: "ok", 3: "ok"})
    dispose_engines()

    latest = [
        json.loads(line)
        for line in vramflow("show", str(DEMO), "--json", env=env).stdout.splitlines()
    ]
    assert [(r["page"], r["status"], r["model"]) for r in latest] == [
        (1, "ok", "smol"),
        (2, "ok", "smol"),
        (3, "ok", "smol"),
        (4, "pending", "smol"),
        (5, "pending", "smol"),
        (6, "pending", "smol"),
    ]
    older = vramflow("show", str(DEMO), "--json", "--model", "other-model", env=env)
    rows = [json.loads(line) for line in older.stdout.splitlines()]
    assert [(r["page"], r["status"]) for r in rows][:3] == [
        (1, "running"),
        (2, "ok"),
        (3, "pending"),
    ]
    assert {r["model"] for r in rows} == {"other-model"}
    every = vramflow("show", str(DEMO), "--json", "--all", env=env).stdout.splitlines()
    assert len(every) == 12
    text = vramflow("show", str(DEMO), env=env).stdout
    assert "model smol, prompt 'Summarise.'" in text and "1 other model/prompt" in text
    assert "other-model" not in text


def test_show_json_of_a_document_that_failed_to_open(env, home):
    url = database(home)
    ensure_schema(url)
    with session_scope(url) as session:
        queries.record_document(
            session,
            sha256="ab" * 32,
            path="/x/locked.pdf",
            file_name="locked.pdf",
            size_bytes=10,
            status="failed",
            error_type="EncryptedPdfError",
            error_message="/x/locked.pdf is encrypted: pass its password",
        )
    dispose_engines()
    done = vramflow("show", "locked.pdf", "--json", env=env)
    assert done.returncode == 0
    [row] = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["status"] == "failed" and row["document"] == "locked.pdf"
    assert row["error"] == "EncryptedPdfError: /x/locked.pdf is encrypted: pass its password"
