"""`vramflow status` and `vramflow plot` on a database with a run in it and a real Prefect API."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.support.servers import api_url_everywhere, clean_env
from vramflow import slot_records
from vramflow.db import queries
from vramflow.db.schema import ensure_schema
from vramflow.db.session import dispose_engines, session_scope

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN = "11111111-2222-3333-4444-555555555555"
SLOT = "vramflow-gpu-hosta-0"


def vramflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vramflow", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def seed(database_url: str) -> None:
    """A run that answered 4 pages in 2 calls a minute ago (one OOM first), still holds the
    slot, and has 2 more pages running."""
    ensure_schema(database_url)
    now = datetime.now(timezone.utc)
    with session_scope(database_url) as session:
        document_id = queries.record_document(
            session, sha256="c" * 64, path="/a.pdf", file_name="a.pdf", size_bytes=1
        )
        key = queries.ResultKey(document_id, "model", "p" * 64, "s" * 64)
        ids = queries.start_results(session, key, [1, 2, 3, 4, 5, 6], "prompt", "{}", RUN)
        queries.record_hold(
            session,
            hold_id="h1",
            slot_name=SLOT,
            device="cuda:0",
            host="hosta",
            pid=4242,
            flow_run_id=RUN,
            pages=4,
            wait_seconds=0.5,
            acquired_at=now - timedelta(seconds=70),
        )
        calls = [("oom", [1, 2, 3, 4], 70), ("ok", [1, 2], 65), ("ok", [3, 4], 60)]
        attempts = [
            {
                "result_id": ids[page],
                "hold_id": "h1",
                "call_id": f"call-{ago}",
                "flow_run_id": RUN,
                "outcome": outcome,
                "device": "cuda:0",
                "batch_size": len(pages),
                "started_at": now - timedelta(seconds=ago),
                "finished_at": now - timedelta(seconds=ago - 2),
                "infer_seconds": 2.0,
                "tokens_in": 100,
                "tokens_out": 8 if outcome == "ok" else None,
                "torch_max_allocated_bytes": 900 * 2**20,
                "nvml_used_after_bytes": 1500 * 2**20,
                "nvml_total_bytes": 8 * 2**30,
            }
            for outcome, pages, ago in calls
            for page in pages
        ]
        queries.record_attempts(session, attempts)
        for page in (1, 2, 3, 4):
            queries.finish_result(session, ids[page], status="ok", output="answer")
    dispose_engines()


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    database_url = f"sqlite:///{tmp_path / 'vramflow.db'}"
    seed(database_url)
    return clean_env(
        VRAMFLOW_HOME=str(tmp_path / "home"),
        VRAMFLOW_DATABASE_URL=database_url,
        PREFECT_HOME=str(tmp_path / "prefect"),
    )


@pytest.mark.slow
def test_status_shows_slots_holders_queue_and_throughput(env, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    env = {**env, **prefect_server.env}
    with api_url_everywhere(prefect_server.api_url), get_client(sync_client=True) as client:
        for name in (SLOT, "vramflow-gpu-hostb-1", "someone-elses-limit"):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    # This test process stands in the host's line for the slot while status looks.
    records = Path(env["VRAMFLOW_HOME"]) / "slots"
    with slot_records.waiting_line(records, SLOT):
        done = vramflow("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    slots = {s["slot"]: s for s in report["slots"]}
    # Every vramflow slot on the server (other tests' ones too), but not a limit of someone else.
    assert {SLOT, "vramflow-gpu-hostb-1"} <= set(slots) and "someone-elses-limit" not in slots
    [holder] = slots[SLOT]["holders"]
    assert (holder["host"], holder["pid"], holder["flow_run_id"]) == ("hosta", 4242, RUN)
    assert slots[SLOT]["limit"] == 1 and slots["vramflow-gpu-hostb-1"]["holders"] == []
    assert (slots[SLOT]["waiting_here"], slots["vramflow-gpu-hostb-1"]["waiting_here"]) == (1, 0)
    assert report["queue"]["running"] == 2 and report["gpu_workers"] == []
    rate = report["throughput"]
    assert (rate["pages"], rate["calls_ok"], rate["calls_oom"], rate["tokens_out"]) == (
        4,
        2,
        1,
        32,
    )
    assert rate["pages_per_second"] == pytest.approx(4 / 300, abs=1e-4)
    shown = vramflow("status", env=env)
    assert shown.returncode == 0, shown.stderr
    assert SLOT in shown.stdout and "hosta pid 4242" in shown.stdout
    assert "Queue: 2 pages running" in shown.stdout


def test_plot_writes_the_latest_run_as_png_and_html(env, tmp_path):
    done = vramflow("plot", str(tmp_path / "run.png"), env=env)
    assert done.returncode == 0, done.stderr
    assert "3 model calls, 1 slot holds" in done.stdout
    assert (tmp_path / "run.png").read_bytes().startswith(PNG_MAGIC)
    done = vramflow("plot", str(tmp_path / "run.html"), "--minutes", "10", env=env)
    assert done.returncode == 0, done.stderr
    assert "data:image/png;base64," in (tmp_path / "run.html").read_text()


def test_plot_without_runs_is_one_clear_line(tmp_path):
    env = clean_env(VRAMFLOW_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "p"))
    done = vramflow("plot", str(tmp_path / "run.png"), env=env)
    assert done.returncode == 1
    assert "nothing to plot" in done.stderr and "Traceback" not in done.stderr
    assert not Path(tmp_path / "run.png").exists()


@pytest.mark.parametrize(
    ("template", "device", "host"),
    [
        ("vramflow-gpu-{host}-{device}", "cuda:1", "Box.Example"),
        ("team GPU {device}", "cpu", "ignored"),
    ],
)
def test_slot_names_the_template_makes_are_the_ones_status_finds(template, device, host):
    from vramflow.gpu import slot_name
    from vramflow.tasks.slot_status import name_pattern

    pattern = name_pattern(template)
    assert pattern.fullmatch(slot_name(template, device, host))
    assert not pattern.fullmatch("someone-elses-limit")


def test_status_text_lists_gpu_workers_when_the_database_has_them(capsys):
    """The printing side of the GPU-worker hook (`vramflow.db.status.gpu_workers`)."""
    from vramflow import cli_operators
    from vramflow.db.status import GpuWorker

    worker = GpuWorker("w1", "hosta", 77, "cuda:0", 12, datetime(2026, 1, 2, tzinfo=timezone.utc))
    report = {
        "slots": [],
        "gpu_workers": [vars(worker)],
        "queue": {"running": 0, "pending": 0, "oldest_since": None},
        "throughput": {
            "minutes": 5,
            "pages": 0,
            "pages_per_second": 0.0,
            "calls_ok": 0,
            "calls_oom": 0,
            "tokens_out": 0,
        },
    }
    cli_operators._print_status(report)
    out = capsys.readouterr().out
    assert "hosta pid 77 (cuda:0, 12 pages waiting, heartbeat 2026-01-02T00:00:00Z)" in out
