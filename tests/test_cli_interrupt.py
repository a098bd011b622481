"""Stopping `vramflow run`: Ctrl-C keeps statuses true; a killed run's server does not linger."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import psutil
import pytest

from vramflow import orphans
from vramflow.demo.pdfgen import write_text_pdf

WAIT_S = 240


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VRAMFLOW_", "PREFECT_"))}
    return {**clean, "VRAMFLOW_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "p")}


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_a_server_recorded_by_a_process_that_died_is_stopped(tmp_path: Path):
    folder = tmp_path / "servers"
    orphan, kept = _sleeper(), _sleeper()
    try:
        owner = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time; from pathlib import Path; from vramflow import orphans; "
                "orphans.record_server(Path(sys.argv[1]), int(sys.argv[2])); print(flush=True); "
                "time.sleep(600)",
                str(folder),
                str(orphan.pid),
            ],
            stdout=subprocess.PIPE,
        )
        owner.stdout.readline()  # recorded
        owner.kill()
        owner.wait()
        orphans.record_server(folder, kept.pid)  # this process is alive: its server stays
        assert orphans.stop_orphans(folder) == [orphan.pid]
        assert orphan.wait(timeout=10) is not None
        assert kept.poll() is None
        assert [p.name for p in folder.iterdir()] == [f"{os.getpid()}.json"]
        assert orphans.stop_orphans(folder) == []
    finally:
        for process in (orphan, kept):
            process.kill()
            process.wait()


def _long_pdf(tmp_path: Path) -> Path:
    texts = [f"Page {n}. The pump in hall {n} was serviced on Monday." for n in range(1, 21)]
    return write_text_pdf(tmp_path / "long.pdf", texts)


def _start(pdf: Path, model: Path, env: dict[str, str], out: Path) -> subprocess.Popen:
    """`vramflow run` writing to files: a temporary server it leaves behind would hold pipes
    open, and reading them to the end would wait for that server."""
    command = [sys.executable, "-m", "vramflow", "run", str(pdf), "--model", str(model)]
    command += ["--max-new-tokens", "100", "--batch-size", "1"]
    with open(out.with_suffix(".out"), "w") as stdout, open(out.with_suffix(".err"), "w") as err:
        return subprocess.Popen(command, env=env, stdout=stdout, stderr=err, text=True)


def _output(out: Path) -> tuple[str, str]:
    return out.with_suffix(".out").read_text(), out.with_suffix(".err").read_text()


def _rows(home: Path, query: str) -> list[tuple]:
    database = home / "vramflow.db"
    if not database.exists():
        return []
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        try:
            return connection.execute(query).fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return []


def _wait_until(condition, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert process.poll() is None, f"vramflow ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {WAIT_S} s"
        time.sleep(0.2)  # polling the database, not waiting for a race


def _server_record(home: Path) -> dict:
    [record] = (home / "servers").glob("*.json")
    return json.loads(record.read_text())


@pytest.mark.slow
def test_ctrl_c_says_what_was_kept_and_leaves_no_status_running(env, tiny_model_dir, tmp_path):
    home = Path(env["VRAMFLOW_HOME"])
    run = _start(_long_pdf(tmp_path), tiny_model_dir, env, tmp_path / "run")
    ok = "select count(*) from results where status = 'ok'"
    _wait_until(lambda: _rows(home, ok) and _rows(home, ok)[0][0] >= 1, "answered page", run)
    server = _server_record(home)["server_pid"]
    run.send_signal(signal.SIGINT)
    run.wait(timeout=60)
    out, err = _output(tmp_path / "run")
    assert run.returncode == 130, err
    assert "Traceback" not in out + err
    [line] = [x for x in err.splitlines() if x.startswith("interrupted:")]
    answered = _rows(home, ok)[0][0]
    assert line.startswith(f"interrupted: long.pdf: {answered} pages answered in this run")
    assert "run the same command again to resume" in line
    assert _rows(home, "select status from documents") == [("stopped",)]
    statuses = {s for (s,) in _rows(home, "select status from results")}
    assert "running" not in statuses
    failed = _rows(home, "select error_type from results where status = 'failed'")
    assert all(kind == "Interrupted" for (kind,) in failed)
    assert not psutil.pid_exists(server) or psutil.Process(server).status() == "zombie"
    assert not list((home / "servers").glob("*.json"))


@pytest.mark.slow
def test_the_next_run_stops_the_server_a_killed_run_left_behind(env, tiny_model_dir, tmp_path):
    home = Path(env["VRAMFLOW_HOME"])
    first = _start(_long_pdf(tmp_path), tiny_model_dir, env, tmp_path / "first")
    _wait_until(lambda: list((home / "servers").glob("*.json")), "server record", first)
    server = _server_record(home)["server_pid"]
    first.kill()
    first.wait()
    assert psutil.Process(server).is_running(), "the temporary server went with its parent"
    one_page = write_text_pdf(tmp_path / "short.pdf", ["One page."])
    command = [
        sys.executable,
        "-m",
        "vramflow",
        "run",
        str(one_page),
        "--model",
        str(tiny_model_dir),
    ]
    second = subprocess.run(
        command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT_S
    )
    assert second.returncode == 0, second.stderr
    assert f"stopped the temporary Prefect server (pid {server})" in second.stderr
    assert not psutil.pid_exists(server) or psutil.Process(server).status() == "zombie"
