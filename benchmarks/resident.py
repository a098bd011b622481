"""A resident GPU worker under load: runs triggered at once, and many small documents.

    python benchmarks/resident.py --max-new-tokens 32
    python benchmarks/resident.py --model ./tiny --max-new-tokens 2 --burst-pages 1 \\
        --sweep-documents 4 --json

Starts its own stack in a work folder, whatever VRAMFLOW_* the caller's environment says: a real
`prefect server start` (on SQLite, or on `--prefect-database-url`), the `vramflow-gpu` process
pool with the repository's deployments, one `prefect worker start` and one `vramflow gpu-worker`;
one warm-up run loads the model. Then:
  alone   one process-pdf run of `--burst-pages` pages, with nothing else running
  burst   `--runs` process-pdf runs of `--burst-pages` pages, triggered at once through the REST API
  single  one process-pdf run over `--sweep-documents` x 2 pages at batch size 8
  sweep   one sweep-inbox run over `--sweep-documents` documents of 2 pages at batch size 8
A sampler follows every flow-run process the Prefect worker starts (peak RSS, whether torch is
loaded) and matches it to its flow run. Figures: model loads in the whole run (the GPU worker's
models plus flow-run processes with torch), the most model calls at once on the device, each
burst run's seconds from its process start to its first model call, and the sweep's pages per
second over the single document's (the same pages' worth, in the same run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from pages import prose_pages, warmup_pdf  # noqa: E402
from resident_stack import Sampler, Stack  # noqa: E402

from vramflow.demo.pdfgen import write_text_pdf  # noqa: E402


def first_calls(url: str) -> dict[str, float]:
    """flow run id → epoch seconds of the first model call carrying one of its pages."""
    from sqlalchemy import func, select

    from vramflow.db.models import Attempt
    from vramflow.db.session import session_scope

    with session_scope(url) as session:
        rows = session.execute(
            select(Attempt.flow_run_id, func.min(Attempt.started_at)).group_by(Attempt.flow_run_id)
        ).all()
    return {run: started.timestamp() for run, started in rows if run}


def calls(url: str) -> list[tuple[float, float, int]]:
    """(start, end, documents carried) of every model call, by start."""
    from sqlalchemy import func, select

    from vramflow.db.models import Attempt, Result
    from vramflow.db.session import session_scope

    with session_scope(url) as session:
        rows = session.execute(
            select(
                Attempt.call_id,
                func.min(Attempt.started_at),
                func.max(Attempt.finished_at),
                func.count(func.distinct(Result.document_id)),
            )
            .join(Result, Result.id == Attempt.result_id)
            .group_by(Attempt.call_id)
        ).all()
    return sorted((start.timestamp(), end.timestamp(), docs) for _, start, end, docs in rows)


def most_at_once(intervals: list[tuple[float, float, int]]) -> int:
    """The most model calls that ran at the same moment."""
    edges = sorted([(s, 1) for s, _, _ in intervals] + [(e, -1) for _, e, _ in intervals])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def first_batch_at_worker(stack: Stack, run_ids: list[str]) -> dict[str, float]:
    """flow run id → epoch seconds when the GPU worker started its first inference task run
    (its pages then wait in the engine's queue for a model call)."""
    from datetime import datetime

    query = {"flow_runs": {"id": {"any_": run_ids}}, "task_runs": {"name": {"like_": "infer"}}}
    found: dict[str, float] = {}
    for task_run in stack._call("POST", "task_runs/filter", json=query):
        if task_run.get("start_time"):
            started = datetime.fromisoformat(task_run["start_time"]).timestamp()
            run = task_run["flow_run_id"]
            found[run] = min(started, found.get(run, started))
    return found


def models_held(url: str) -> int:
    from sqlalchemy import func, select

    from vramflow.db.models import GpuWorker
    from vramflow.db.session import session_scope

    with session_scope(url) as session:
        return int(session.scalar(select(func.sum(GpuWorker.models_loaded))) or 0)


def wall(run: dict[str, Any]) -> float:
    from datetime import datetime

    start, end = (datetime.fromisoformat(run[k]) for k in ("start_time", "end_time"))
    return (end - start).total_seconds()


def documents(folder: Path, count: int, pages: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    texts = prose_pages(count * pages, seed)
    return [
        write_text_pdf(folder / f"doc{n:02d}.pdf", texts[n * pages : (n + 1) * pages])
        for n in range(count)
    ]


def measure(stack: Stack, args: argparse.Namespace, sampler: Sampler) -> dict[str, Any]:
    generation = {"model": stack.model, "max_new_tokens": args.max_new_tokens}
    [warm] = stack.wait(
        [stack.trigger("process-pdf", path=str(warmup_pdf(stack.folder)), **generation)]
    )
    [alone_doc] = documents(stack.folder / "alone", 1, args.burst_pages, seed=4)
    [alone] = stack.wait([stack.trigger("process-pdf", path=str(alone_doc), **generation)])
    burst_docs = documents(stack.folder / "burst", args.runs, args.burst_pages, seed=1)
    burst_started = time.time()
    ids = [
        stack.trigger("process-pdf", path=str(p), batch_size=args.burst_batch_size, **generation)
        for p in burst_docs
    ]
    burst = stack.wait(ids)
    burst_wall = time.time() - burst_started
    inbox = stack.folder / "inbox"
    documents(inbox, args.sweep_documents, 2, seed=2)
    [big] = documents(stack.folder / "single", 1, 2 * args.sweep_documents, seed=3)
    [single] = stack.wait([stack.trigger("process-pdf", path=str(big), batch_size=8, **generation)])
    [sweep] = stack.wait(
        [
            stack.trigger(
                "sweep-inbox",
                inbox=str(inbox),
                batch_size=8,
                documents_at_once=args.sweep_documents,
                **generation,
            )
        ]
    )
    time.sleep(1.0)  # the sampler's last looks at the ended processes
    every = [warm, alone, *burst, single, sweep]
    return summarize(stack, args, sampler, every, burst, burst_wall, single, sweep)


def summarize(stack, args, sampler, every, burst, burst_wall, single, sweep) -> dict[str, Any]:
    firsts = first_calls(stack.database_url)
    procs = {p.flow_run_id: p for p in sampler.seen.values()}
    to_first = [
        firsts[r["id"]] - procs[r["id"]].started
        for r in burst
        if r["id"] in procs and r["id"] in firsts
    ]
    alone = alone_steps(stack, every[1], procs, firsts)  # after the warm-up run: model loaded
    at_worker = first_batch_at_worker(stack, [r["id"] for r in burst])
    to_worker = [at_worker[r] - procs[r].started for r in at_worker if r in procs]
    intervals = calls(stack.database_url)
    sweep_start = wall_start(sweep)
    pages = 2 * args.sweep_documents
    return {
        "runs_completed": sum(r["state"]["type"] == "COMPLETED" for r in every),
        "runs": len(every),
        "model_loads": models_held(stack.database_url)
        + sum(p.torch_loaded for p in sampler.seen.values()),
        "flow_processes": len(sampler.seen),
        "flow_processes_with_torch": sum(p.torch_loaded for p in sampler.seen.values()),
        "flow_process_peak_rss_mib": max(p.peak_rss for p in sampler.seen.values()) / 2**20,
        "calls_at_once": most_at_once(intervals),
        "burst_wall_s": burst_wall,
        "alone_start_to_running_s": alone[0],
        "alone_start_to_gpu_worker_s": alone[1],
        "alone_start_to_first_call_s": alone[2],
        "burst_start_to_first_call_s": sorted(to_first),
        "burst_start_to_gpu_worker_s": sorted(to_worker),
        "single_pages_per_s": pages / wall(single),
        "sweep_pages_per_s": pages / wall(sweep),
        "sweep_over_single": wall(single) / wall(sweep),
        "sweep_calls_with_several_documents": sum(
            1 for start, _, docs in intervals if start >= sweep_start and docs > 1
        ),
    }


def alone_steps(
    stack: Stack, run: dict[str, Any], procs: dict[str | None, Any], firsts: dict[str, float]
) -> tuple[float | None, float | None, float | None]:
    """Seconds from a run's process start to: its flow running, its first batch at the GPU
    worker, its first model call (None for what was not seen)."""
    proc = procs.get(run["id"])
    if proc is None:
        return None, None, None
    at_worker = first_batch_at_worker(stack, [run["id"]]).get(run["id"])
    return (
        wall_start(run) - proc.started,
        None if at_worker is None else at_worker - proc.started,
        firsts[run["id"]] - proc.started if run["id"] in firsts else None,
    )


def wall_start(run: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(run["start_time"]).timestamp()


def print_table(result: dict[str, Any], args: argparse.Namespace, out: Any = sys.stdout) -> None:
    firsts, ats = result["burst_start_to_first_call_s"], result["burst_start_to_gpu_worker_s"]
    alone = [result[f"alone_start_to_{step}_s"] for step in ("running", "gpu_worker", "first_call")]
    rows = [
        ("runs completed", f"{result['runs_completed']} / {result['runs']}"),
        ("model loads in the whole run", result["model_loads"]),
        (
            "flow-run processes (with torch)",
            f"{result['flow_processes']} ({result['flow_processes_with_torch']})",
        ),
        ("flow-run process peak RSS", f"{result['flow_process_peak_rss_mib']:.0f} MiB"),
        ("model calls at once on the device (most)", result["calls_at_once"]),
        (f"{args.runs} runs at once: wall", f"{result['burst_wall_s']:.1f} s"),
        (
            "one run alone: process start to flow running / batch at GPU worker / model call",
            " / ".join("-" if step is None else f"{step:.1f}" for step in alone) + " s",
        ),
        ("process start to first batch at the GPU worker (min / median / max)", _spread(ats)),
        ("process start to first model call (min / median / max)", _spread(firsts)),
        ("single document, batch 8", f"{result['single_pages_per_s']:.2f} pages/s"),
        (
            f"sweep of {args.sweep_documents} x 2 pages, batch 8",
            f"{result['sweep_pages_per_s']:.2f} pages/s",
        ),
        ("sweep / single", f"{result['sweep_over_single']:.2f}x"),
        ("sweep calls carrying several documents", result["sweep_calls_with_several_documents"]),
    ]
    width = max(len(name) for name, _ in rows)
    print(
        f"resident GPU worker: model {args.model}, {args.max_new_tokens} new tokens, "
        f"device {args.device_label}, results on SQLite, Prefect server on "
        + ("PostgreSQL" if args.prefect_database_url else "SQLite")
        + (", runs started without the workspace supervisor" if args.engine_command else ""),
        file=out,
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}", file=out)


def _spread(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    return f"{seconds[0]:.1f} / {seconds[len(seconds) // 2]:.1f} / {seconds[-1]:.1f} s"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=8, help="runs triggered at once (default 8)")
    parser.add_argument("--burst-pages", type=int, default=2, help="pages per burst run")
    parser.add_argument("--burst-batch-size", type=int, default=8)
    parser.add_argument("--sweep-documents", type=int, default=16)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument(
        "--model-cache-dir", type=Path, default=None, help="reuse converted models kept here"
    )
    parser.add_argument(
        "--engine-command",
        action="store_true",
        help="give runs the process worker's `command` job variable (this Python's\n"
        "`-m prefect.engine`), which skips Prefect's workspace supervisor process",
    )
    parser.add_argument(
        "--prefect-database-url",
        default=None,
        help="the Prefect server's database (postgresql+asyncpg://...; an empty database of\n"
        "a running server), instead of SQLite, which answers busy writes with 503s",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    folder = args.work_dir or Path(tempfile.mkdtemp(prefix="vramflow-resident-"))
    folder.mkdir(parents=True, exist_ok=True)
    args.device_label = "cpu"
    if args.model_cache_dir:  # the converted default model, instead of converting it again
        (folder / "home").mkdir(exist_ok=True)
        (folder / "home" / "models").symlink_to(args.model_cache_dir.resolve())
    stack = Stack(folder.resolve(), args.model)
    if args.prefect_database_url:
        stack.env["PREFECT_API_DATABASE_CONNECTION_URL"] = args.prefect_database_url
    if args.engine_command:
        stack.job_variables["command"] = f"{sys.executable} -m prefect.engine"
    try:
        stack.start()
        sampler = Sampler(stack.worker.pid)
        threading.Thread(target=sampler.run, daemon=True).start()
        result = measure(stack, args, sampler)
        sampler.stop.set()
    finally:
        stack.stop()
    print_table(result, args, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0 if result["runs_completed"] == result["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
