"""The `vramflow` command: help with examples, README coverage, clear errors, `show --json`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from vramflow.cli import app
from vramflow.config import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SHOW_FIELDS = {
    "page",
    "status",
    "output",
    "device",
    "attempts",
    "tokens_in",
    "tokens_out",
    "infer_started_at",
    "infer_finished_at",
    "peak_vram_bytes",
}


def command_names() -> list[str]:
    group = typer.main.get_command(app)
    names = []
    for name, command in group.commands.items():
        sub = getattr(command, "commands", None)
        names.extend(f"{name} {s}" for s in sub) if sub else names.append(name)
    return names


@pytest.mark.parametrize("name", command_names())
def test_every_command_has_an_example_and_is_in_the_readme(name):
    group = typer.main.get_command(app)
    command = group
    for part in name.split():
        command = command.commands[part]
    assert "Example:" in (command.help or "")
    assert f"vramflow {name}" in README


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented(field):
    assert f"VRAMFLOW_{field.upper()}" in README


def vramflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vramflow", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture
def cli_env(tmp_path, monkeypatch) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VRAMFLOW_", "PREFECT_"))}
    return {
        **env,
        "VRAMFLOW_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }


def test_show_unknown_document_is_one_clear_line(cli_env):
    done = vramflow("show", "nothing-like-this.pdf", env=cli_env)
    assert done.returncode == 1
    assert "no stored document matches" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_run_then_show_json_and_a_broken_file(cli_env, tiny_model_dir, tmp_path):
    demo = Path(__file__).resolve().parents[1] / "vramflow" / "demo" / "demo.pdf"
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n garbage")
    done = vramflow(
        "run",
        str(demo),
        str(broken),
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "2",
        "--pages",
        "1-3",
        env=cli_env,
    )
    assert done.returncode == 1, done.stderr  # one document failed
    assert "Traceback" not in done.stdout + done.stderr
    rows = summary_rows(done.stdout)
    assert rows["demo.pdf"][0] == "done" and rows["broken.pdf"][0] == "failed", done.stdout
    shown = vramflow("show", str(demo), "--json", env=cli_env)
    every = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [(r["page"], r["status"]) for r in every[3:]] == [
        (4, "pending"),
        (5, "pending"),
        (6, "pending"),
    ]
    rows = every[:3]
    assert [r["page"] for r in rows] == [1, 2, 3]
    assert all(set(r) >= SHOW_FIELDS for r in every)
    assert all(r["status"] == "ok" and r["device"] == "cpu" and r["attempts"] == 1 for r in rows)
    assert all(r["infer_started_at"].endswith("Z") and r["peak_vram_bytes"] is None for r in rows)
    again = vramflow(
        "run",
        str(demo),
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "2",
        "--pages",
        "1-3",
        env=cli_env,
    )
    assert again.returncode == 0 and "all 3 pages already done" in again.stdout
    # ok, failed, no text, done before, pages/s: nothing was inferred again
    assert summary_rows(again.stdout)["demo.pdf"][:6] == ["done", "3", "0", "0", "3", "0.00"]


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """The run summary table's rows by document: status, ok, failed, ... (not the header)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃").split("│")]
        if len(cells) == 9 and cells[0].endswith(".pdf"):
            rows[cells[0]] = cells[1:]
    return rows
