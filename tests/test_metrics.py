"""Prometheus metrics: the API a GPU worker calls, scraped over HTTP, and `serve --metrics-port`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.process_tree import stop_process_tree
from tests.support.servers import clean_env, free_port, wait_for_http
from vramflow import metrics
from vramflow.inference import CallRecord
from vramflow.models import Generation


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint, keyed by (name, sorted labels)."""
    text = httpx.get(url, timeout=10).raise_for_status().text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _call(outcome: str, pages: list[int], seconds: float = 0.5) -> CallRecord:
    now = datetime.now(timezone.utc)
    generations = {p: Generation("answer", 100, 8, False) for p in pages} if outcome == "ok" else {}
    return CallRecord(
        call_id=f"call-{outcome}",
        pages=pages,
        outcome=outcome,
        error_type=None,
        error_message=None,
        device="cuda:0",
        started_at=now,
        finished_at=now,
        infer_seconds=seconds,
        generations=generations,
        torch_max_allocated_bytes=123 * 2**20,
    )


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    # "cpu" has no NVML figures: the collector must publish none, not zeros.
    server = metrics.start_server(0, addr="127.0.0.1", devices=lambda: ["cpu"])
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def test_what_a_gpu_worker_records_moves_its_metrics(endpoint):
    before = scrape(endpoint)
    metrics.model_loaded()
    metrics.pages_waiting.set(7)
    metrics.slot_waited(0.3)
    metrics.slot_held(12.0)
    metrics.record_call(_call("oom", [1, 2, 3, 4]))
    metrics.record_call(_call("ok", [1, 2], seconds=0.5))
    metrics.pages_finished(ok=2, failed=1)
    after = scrape(endpoint)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert moved("vramflow_model_loads_total") == 1
    assert after[("vramflow_pages_waiting", ())] == 7
    assert moved("vramflow_slot_wait_seconds_count") == 1
    assert moved("vramflow_slot_wait_seconds_sum") == pytest.approx(0.3)
    assert moved("vramflow_slot_hold_seconds_sum") == pytest.approx(12.0)
    assert moved("vramflow_model_calls_total", outcome="oom") == 1
    assert moved("vramflow_model_calls_total", outcome="ok") == 1
    assert moved("vramflow_model_call_seconds_count") == 2
    assert moved("vramflow_tokens_in_total") == 200
    assert moved("vramflow_tokens_out_total") == 16
    assert after[("vramflow_tokens_per_second", ())] == pytest.approx(32.0)
    assert after[("vramflow_call_peak_vram_bytes", (("device", "cuda:0"),))] == 123 * 2**20
    assert moved("vramflow_pages_done_total") == 2
    assert moved("vramflow_pages_failed_total") == 1
    assert after[("vramflow_rss_bytes", ())] > 50 * 2**20
    assert not [key for key in after if key[0].startswith("vramflow_vram_")]


def _two_pages_running(database_url: str) -> None:
    from vramflow.db import queries
    from vramflow.db.schema import ensure_schema
    from vramflow.db.session import dispose_engines, session_scope

    ensure_schema(database_url)
    with session_scope(database_url) as session:
        document_id = queries.record_document(
            session, sha256="b" * 64, path="/x.pdf", file_name="x.pdf", size_bytes=1
        )
        key = queries.ResultKey(document_id, "model", "p" * 64, "s" * 64)
        queries.start_results(session, key, [1, 2], "prompt", "{}", None)
    dispose_engines()


@pytest.mark.slow
def test_serve_exposes_metrics_on_its_port(prefect_server, tmp_path):
    """`vramflow serve --metrics-port` against a real server: memory and the results table."""
    database_url = f"sqlite:///{tmp_path / 'vramflow.db'}"
    _two_pages_running(database_url)
    port = free_port()
    env = clean_env(
        **prefect_server.env,
        VRAMFLOW_HOME=str(tmp_path / "home"),
        VRAMFLOW_DATABASE_URL=database_url,
    )
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "vramflow", "serve", "--quiet", "--metrics-port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for_http(url, serve, log_path, timeout=120)
        samples = scrape(url)
    finally:
        stop_process_tree(serve)
    assert samples[("vramflow_rss_bytes", ())] > 0
    assert samples[("vramflow_results", (("status", "running"),))] == 2
    assert ("vramflow_model_calls_total", (("outcome", "ok"),)) not in samples  # none made here
    assert ("vramflow_pages_waiting", ()) in samples
    names = {name for name, _ in samples}
    assert "vramflow_slot_wait_seconds_count" in names
