"""The per-page table and the picture of a run: shaping, plot files, the flow's artifacts."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from vramflow import page_table, plot
from vramflow.db.run_views import PageLine
from vramflow.errors import VramflowError
from vramflow.timeline import Call, Hold, Timeline

DEMO = Path(__file__).resolve().parents[1] / "vramflow" / "demo" / "demo.pdf"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _line(page: int, status: str = "ok") -> PageLine:
    failed = status == "failed"
    return PageLine(
        page=page,
        status=status,
        output=None if failed else f"answer {page} " + "word " * 50,
        error="InferenceOOMError: out of memory" if failed else None,
        tokens_in=100,
        tokens_out=8,
        model_seconds=0.5,
        peak_vram_bytes=None,
        peak_rss_bytes=1800 * 2**20,
        attempts=3 if failed else 1,
    )


def test_a_short_document_shows_every_page_with_its_figures():
    rows = page_table.table_rows([_line(1), _line(2, "failed")], "vramflow show abc")
    assert [r["page"] for r in rows] == [1, 2]
    ok, failed = rows
    assert ok["answer"].startswith("answer 1 word") and ok["answer"].endswith("…")
    assert len(ok["answer"]) == page_table.ANSWER_CHARS
    assert (ok["tokens in"], ok["tokens out"], ok["model s"]) == (100, 8, "0.50")
    assert ok["peak memory"] == "1,800 MiB RSS"
    assert failed["answer"] == "InferenceOOMError: out of memory" and failed["attempts"] == 3


def test_a_long_document_shows_its_first_pages_every_failure_and_how_to_see_the_rest():
    lines = [_line(n, "failed" if n in (150, 400) else "ok") for n in range(1, 501)]
    rows = page_table.table_rows(lines, "vramflow show abc")
    pages = [r["page"] for r in rows]
    assert pages == [*range(1, page_table.FIRST_ROWS + 1), 150, 400, "..."]
    last = rows[-1]
    assert last["status"] == f"{500 - page_table.FIRST_ROWS - 2} more"
    assert last["answer"] == f"{500 - page_table.FIRST_ROWS - 2} ok; all pages: vramflow show abc"


def test_peak_memory_prefers_vram_and_falls_back_to_rss():
    assert page_table.peak_memory(3 * 2**20, 10 * 2**20) == "3.0 MiB VRAM"
    assert page_table.peak_memory(None, None) == "-"


def _timeline(device: str = "cpu") -> Timeline:
    t0 = datetime(2026, 12, 7, tzinfo=timezone.utc)
    gpu = device.startswith("cuda")
    calls = [
        Call(
            t0 + timedelta(seconds=i),
            t0 + timedelta(seconds=i + 0.8),
            4,
            "oom" if i == 2 else "ok",
            device,
            torch_peak_bytes=(500 + i) * 2**20 if gpu else None,
            nvml_used_bytes=(900 + i) * 2**20 if gpu else None,
            nvml_total_bytes=8 * 2**30 if gpu else None,
            rss_bytes=(1800 + i) * 2**20,
        )
        for i in range(6)
    ]
    holds = [Hold("vramflow-gpu-h-0", t0, t0 + timedelta(seconds=6), 24, 0.2)]
    return Timeline("demo.pdf", calls, holds)


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_plot_writes_a_png_and_an_html_page(tmp_path, device):
    png = plot.write(_timeline(device), tmp_path / "run.png")
    assert png.read_bytes().startswith(PNG_MAGIC)
    page = plot.write(_timeline(device), tmp_path / "run.html").read_text()
    encoded = page.split("data:image/png;base64,", 1)[1].split("'", 1)[0]
    assert base64.b64decode(encoded).startswith(PNG_MAGIC)


def test_plot_refuses_an_empty_run_and_an_unknown_format(tmp_path):
    with pytest.raises(VramflowError, match="nothing to plot"):
        plot.png_bytes(Timeline("empty"))
    with pytest.raises(VramflowError, match=r"\.png or \.html"):
        plot.write(_timeline(), tmp_path / "run.jpg")


@pytest.fixture
def env(tmp_path, monkeypatch, prefect_harness):
    monkeypatch.setenv("VRAMFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VRAMFLOW_OOM_RETRY_DELAY_SECONDS", "0")
    monkeypatch.setenv("VRAMFLOW_OOM_RETRIES", "0")
    monkeypatch.delenv("VRAMFLOW_DATABASE_URL", raising=False)
    return f"sqlite:///{tmp_path / 'home' / 'vramflow.db'}"


def _artifacts(flow_run_id: str) -> dict[str, dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found if a.key}


def test_a_document_run_publishes_its_pages_and_its_picture(env, tiny_model_dir, monkeypatch):
    from vramflow.flows.process_pdf import process_pdf

    monkeypatch.setenv("VRAMFLOW_INJECT_OOM", "page=3,times=all")
    state = asyncio.run(
        process_pdf(
            path=str(DEMO),
            model=str(tiny_model_dir),
            max_new_tokens=3,
            batch_size=4,
            return_state=True,
        )
    )
    assert state.is_failed()  # a page failed: the run says so
    summary = state.result(raise_on_failure=False)
    assert summary["pages_ok"] == 5 and summary["pages_failed"] == 1
    artifacts = _artifacts(summary["flow_run_id"])
    [pages] = [a for key, a in artifacts.items() if key.startswith("vramflow-pages-")]
    rows = pages.data if isinstance(pages.data, list) else json.loads(pages.data)
    assert [r["page"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert rows[2]["answer"].startswith("OutOfMemoryError: CUDA out of memory (injected")
    # A call with other pages, then the page alone (how the pages of the document's two
    # batches were grouped into calls depends on which batch reached the engine first).
    assert rows[2]["attempts"] >= 2
    assert all(r["peak memory"].endswith("MiB RSS") for r in rows)  # a CPU: no VRAM figures
    assert all(0 < r["tokens out"] <= 3 for r in rows if r["status"] == "ok")
    [picture] = [a for key, a in artifacts.items() if key.startswith("vramflow-picture-")]
    encoded = picture.data.split("data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(encoded).startswith(PNG_MAGIC)
    assert f"--run {summary['flow_run_id']}" in picture.data
