"""The benchmark scripts end to end with a tiny model: the JSON rows other tools read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ["sequential", "naive_async", "flow_batch1", "flow_best", "flow_tokens"]
KEYS = {
    "name",
    "pages_per_s",
    "ratio_to_sequential",
    "overhead_ms_per_page",
    "peak_rss_bytes",
    "peak_vram_bytes",
    "max_concurrent_calls",
    "slot_busy_fraction",
    "batch_size",
    "pages",
    "wall_seconds",
    "model_seconds",
    "non_model_ms_per_page",
    "work_seconds",
}


def run_json(
    script: str, options: list[str], model: Path, folder: Path, **caller: str
) -> tuple[list, str]:
    """Run a benchmark script with `--json` on a temporary server of its own: (rows, stderr).
    `caller`: more environment variables of the caller, which the benchmark must not use."""
    command = [sys.executable, str(REPO / "benchmarks" / script), "--json", *options]
    command += ["--model", str(model), "--model-cache-dir", str(folder / "models")]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | caller
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), done.stderr


def test_throughput_json_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A budget of 64 tokens, less than any page: flow_tokens' engine must make a call per page
    # (3) where flow_best makes 2 calls of up to 2 pages, so the budget reached its process.
    options = ["--pages", "3", "--max-new-tokens", "2", "--batch-sizes", "2"]
    options += ["--max-batch-tokens", "64"]
    # A caller's own database (and other settings) once reached every variant: the second
    # found every page done and the run failed.
    shared = tmp_path / "callers.db"
    caller = {
        "VRAMFLOW_DATABASE_URL": f"sqlite:///{shared}",
        "VRAMFLOW_HOME": str(tmp_path / "callers-home"),
        "VRAMFLOW_MODEL": "no-such-model",
    }
    rows, stderr = run_json("throughput.py", options, tiny_model_dir, tmp_path, **caller)
    assert not shared.exists() and not (tmp_path / "callers-home").exists()

    assert [row["name"] for row in rows] == NAMES
    assert all(set(row) == KEYS for row in rows)
    by_name = {row["name"]: row for row in rows}
    assert by_name["flow_batch1"]["max_concurrent_calls"] == 1
    assert by_name["flow_best"]["max_concurrent_calls"] == 1
    assert by_name["naive_async"]["max_concurrent_calls"] > 1
    assert by_name["sequential"]["max_concurrent_calls"] == 1
    assert by_name["sequential"]["ratio_to_sequential"] == 1.0
    assert by_name["flow_batch1"]["batch_size"] == 1
    for row in rows:  # the page work includes the model call, and both fit in the wall time
        assert 0 < row["model_seconds"] <= row["work_seconds"] <= row["wall_seconds"]
    assert by_name["flow_best"]["batch_size"] == 2
    assert by_name["flow_tokens"]["batch_size"] == 2  # requests of the largest candidate
    assert by_name["flow_tokens"]["max_concurrent_calls"] == 1
    for row in rows:
        assert row["pages"] == 3
        assert row["pages_per_s"] > 0
        assert row["peak_rss_bytes"] > 0
    for name in ("flow_batch1", "flow_best", "flow_tokens"):
        assert 0 < by_name[name]["slot_busy_fraction"] <= 1
    assert "device:" in stderr and "database:" in stderr and str(shared) not in stderr
    assert "model calls: flow_best 2, flow_tokens 3" in stderr


def test_mixed_page_set_mixes_real_and_generated_pages_of_very_different_lengths(
    tmp_path: Path,
) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from pages import build_mixed_page_set
    from pypdf import PdfReader

    pdf, described = build_mixed_page_set(tmp_path, 8)

    lengths = [len(page.extract_text().encode()) for page in PdfReader(pdf).pages]
    assert len(lengths) == 8 and "generated" in described
    assert min(lengths) < 600 and max(lengths) > 5000  # a line or a paragraph, and a full page
    assert all(abs(a - b) > 300 for a, b in zip(lengths, lengths[1:], strict=False))


def test_sweep_json_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    options = ["--documents", "3", "--pages-per-document", "2", "--max-new-tokens", "2"]
    rows, _ = run_json("sweep.py", [*options, "--at-once", "1,2"], tiny_model_dir, tmp_path)

    assert [(row["name"], row["documents_at_once"]) for row in rows] == [
        ("sequential", 1),
        ("sweep_at1", 1),
        ("sweep_at2", 2),
    ]
    for row in rows:
        assert row["pages"] == 6 and row["documents"] == 3
        assert row["max_concurrent_calls"] == 1
        assert row["pages_per_s"] > 0
    for row in rows[1:]:
        assert 0 < row["slot_busy_fraction"] <= 1


def test_paired_runs_compare_each_flow_run_with_the_loop_runs_around_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    options = ["--pages", "2", "--pairs", "1", "--max-new-tokens", "2"]
    rows, _ = run_json("paired.py", options, tiny_model_dir, tmp_path)

    [row] = rows
    assert row["pair"] == 1 and len(row["sequential_pages_per_s"]) == 2
    loop_rate = 2 / (sum(2 / rate for rate in row["sequential_pages_per_s"]) / 2)
    assert abs(row["ratio"] - row["flow_pages_per_s"] / loop_rate) < 1e-9
    assert row["model_time_ratio"] > 0
    assert 0 < row["flow_overhead_ms_per_page"] < row["flow_non_model_ms_per_page"]


def test_handoff_timeline_reports_each_gap_between_model_calls(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    options = ["--pages", "3", "--max-new-tokens", "2"]
    summary, _ = run_json("handoffs.py", options, tiny_model_dir, tmp_path)

    assert summary["calls"] == 3 and len(summary["gaps_ms"]) == 2
    assert all(gap >= 0 for gap in summary["gaps_ms"])
    assert summary["acquired_from_server"] >= 1
    assert 0 < summary["before_first_call_seconds"] < summary["wall_seconds"]


def test_resident_gpu_worker_serves_every_run_with_one_model_load(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    options = ["--max-new-tokens", "2", "--runs", "3", "--burst-pages", "1"]
    options += ["--sweep-documents", "3", "--work-dir", str(tmp_path / "work")]
    result, _ = run_json("resident.py", options, tiny_model_dir, tmp_path)

    # warm-up, one alone, 3 at once, single, sweep
    assert result["runs_completed"] == result["runs"] == 7
    assert result["model_loads"] == 1
    assert result["flow_processes"] == 7 and result["flow_processes_with_torch"] == 0
    assert result["calls_at_once"] == 1
    assert len(result["burst_start_to_first_call_s"]) == 3
    assert all(seconds > 0 for seconds in result["burst_start_to_first_call_s"])
    assert len(result["burst_start_to_gpu_worker_s"]) == 3
    # the run alone, step by step from its process start
    steps = [result[f"alone_start_to_{s}_s"] for s in ("running", "gpu_worker", "first_call")]
    assert 0 < steps[0] <= steps[1] <= steps[2], steps


def test_gpu_check_rehearses_on_the_cpu_and_prints_one_table(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gpu-check.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke"]
    command += ["--sections", "throughput,sharing,oom,slot", "--json", str(out)]
    command += ["--model", str(tiny_model_dir), "--model-cache-dir", str(tmp_path / "models")]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    checks = json.loads(out.read_text())["checks"]
    by_name = {(row["section"], row["name"]): row for row in checks}
    assert done.stdout.count("| section ") == 1  # one table
    assert not any(row["result"].startswith("FAIL:") for row in checks)  # no section broke off
    for section in ("real OOM with ballast", "slot: 3 processes, ballast 0.6 of the card each"):
        assert by_name[(section, "-")]["result"] == "skipped: no CUDA device"
    assert by_name[("throughput 3 pages", "continuous batching used by its flow")]["passed"]
    assert by_name[("throughput 3 pages", "out-of-memory calls, every flow")]["passed"]
    assert ("throughput 3 pages", "flow / plain loop, continuous") in by_name
    assert by_name[("two models sharing the card", "pages ok")]["figure"] == "6"
    assert by_name[("two models sharing the card", "out-of-memory calls")]["passed"]
