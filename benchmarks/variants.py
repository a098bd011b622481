"""Run one benchmark variant in this (fresh) process and write its measurements as JSON.

    python benchmarks/variants.py VARIANT --pdf FILE --home DIR --out RESULT.json [options]

VARIANT is `sequential` (pypdf + one generate call per page, no Prefect), `naive_async`
(`asyncio.gather` over the pages, each extracted and generated in a thread), `flow`
(vramflow's `process_pdf` flow with a fresh SQLite database under DIR, on the Prefect server at
`--prefect-api-url`, or else on a temporary local server of its own) or `sweep` (the
`sweep_inbox` flow over the folder FILE, `--documents-at-once` documents side by side).
`sequential` and `naive_async` read every PDF of the folder in name order when FILE is one.

The model is loaded, the flow's PDF worker processes are started and every variant is warmed up
on a one-page document before the clock starts; each `generate` call is counted by a wrapper on
the model instance, and the page work (pypdf extraction, in this process for the loops and
through the PDF worker processes for the flow, and `generate_batch`: prompt, tokens, generate,
decode) by wrappers on those functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from isolation import own_state  # noqa: E402
from meter import CallMeter, Intervals, cpu_stall_us, device_name, peak_rss_bytes  # noqa: E402
from pages import DEMO_PAGES, warmup_pdf  # noqa: E402

from vramflow.config import PREFECT_SERVER_DEFAULTS  # noqa: E402

VARIANTS = ("sequential", "naive_async", "flow", "sweep")
# The work every variant does per page; wall time outside it is what the orchestration costs.
PAGE_WORK = Intervals()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--pdf", type=Path, required=True)
    parser.add_argument("--home", type=Path, required=True, help="fresh folder for this run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-cache-dir", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-input-tokens", type=int, default=1536)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--max-batch-tokens", type=int, default=None, help="flow: VRAMFLOW_MAX_BATCH_TOKENS"
    )
    parser.add_argument("--documents-at-once", type=int, default=1, help="sweep only")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument(
        "--prefect-api-url", help="a running server (default: start a temporary one here)"
    )
    return parser.parse_args(argv)


class Sampler:
    """Samples this process's thread count and RSS in the background while the clock runs."""

    def __init__(self, every_s: float = 0.2) -> None:
        import psutil

        self._process, self._every = psutil.Process(), every_s
        self._stop = threading.Event()
        self.max_threads = 0
        self.rss: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_threads = max(self.max_threads, self._process.num_threads())
            self.rss.append(self._process.memory_info().rss)
            self._stop.wait(self._every)

    def rss_profile(self, points: int = 10) -> list[int]:
        """RSS at `points` evenly spaced moments of the timed run, in MiB."""
        if not self.rss:
            return []
        step = max(1, len(self.rss) // points)
        return [value // 2**20 for value in self.rss[::step]] + [self.rss[-1] // 2**20]

    def __enter__(self) -> Sampler:
        self._stall, self._started = cpu_stall_us(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        stall, wall = cpu_stall_us(), time.perf_counter() - self._started
        self.cpu_pressure = None
        if stall is not None and self._stall is not None and wall > 0:
            self.cpu_pressure = (stall - self._stall) / 1e6 / wall


def _isolate(args: argparse.Namespace) -> None:
    """Point vramflow and Prefect at fresh folders (a fresh database, a fresh temporary server)."""
    own_state(
        os.environ, args.home / "vramflow", VRAMFLOW_MAX_INPUT_TOKENS=str(args.max_input_tokens)
    )
    if args.max_batch_tokens:  # given as an option: own_state drops the caller's VRAMFLOW_*
        os.environ["VRAMFLOW_MAX_BATCH_TOKENS"] = str(args.max_batch_tokens)
    os.environ["PREFECT_HOME"] = str(args.home / "prefect")
    # The flow variants measure the engine in the flow's own process, also on a server of their
    # own; benchmarks/resident.py measures GPU workers.
    os.environ["VRAMFLOW_INFERENCE"] = "in-process"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    for name, value in PREFECT_SERVER_DEFAULTS.items():  # for a temporary server, as the CLI
        os.environ.setdefault(name, value)
    if args.prefect_api_url:
        os.environ["PREFECT_API_URL"] = args.prefect_api_url
    else:
        os.environ.pop("PREFECT_API_URL", None)  # a temporary server, started by the warm-up


def _generate_one(loaded: Any, text: str, device: str, args: argparse.Namespace) -> Any:
    from vramflow.config import DEFAULT_PROMPT
    from vramflow.models import generate_batch

    [answer] = generate_batch(
        loaded,
        DEFAULT_PROMPT,
        [text],
        device=device,
        max_new_tokens=args.max_new_tokens,
        max_input_tokens=args.max_input_tokens,
        timeout_s=3600,
    )
    return answer


@PAGE_WORK.wrap
def _extract(path: Path, number: int, reader: Any = None) -> str:
    from pypdf import PdfReader

    return (reader or PdfReader(path)).pages[number - 1].extract_text()


def pdf_files(path: Path) -> list[Path]:
    """The benchmark's documents: the file itself, or a folder's PDFs in name order."""
    return sorted(path.glob("*.pdf")) if path.is_dir() else [path]


def page_list(path: Path) -> list[tuple[Path, int]]:
    """(document, page number) of every page the variant runs, in order."""
    from pypdf import PdfReader

    return [(f, n) for f in pdf_files(path) for n in range(1, len(PdfReader(f).pages) + 1)]


def run_sequential(
    loaded: Any, device: str, pages: list[tuple[Path, int]], args: argparse.Namespace
):
    from pypdf import PdfReader

    readers = {path: PdfReader(path) for path in pdf_files(args.pdf)}  # one per document
    return [
        _generate_one(loaded, _extract(path, n, readers[path]), device, args) for path, n in pages
    ]


def run_naive_async(
    loaded: Any, device: str, pages: list[tuple[Path, int]], args: argparse.Namespace
):
    async def page(path: Path, number: int) -> Any:
        text = await asyncio.to_thread(_extract, path, number)
        return await asyncio.to_thread(_generate_one, loaded, text, device, args)

    async def every_page() -> list[Any]:
        return await asyncio.gather(*(page(path, n) for path, n in pages))

    return asyncio.run(every_page())


def slot_figures(url: str, started: datetime, finished: datetime) -> dict[str, Any]:
    """Slot busy fraction of the timed run (every flow run in it, after the warm-up) from the
    slot_holds and attempts rows, and the time it spent before its first slot hold and after its
    last (the fixed cost of a document)."""
    from sqlalchemy import select

    from vramflow.db.models import Attempt, SlotHold
    from vramflow.db.session import session_scope

    with session_scope(url) as session:
        holds = session.execute(
            select(SlotHold.acquired_at, SlotHold.released_at).where(
                SlotHold.acquired_at >= started
            )
        ).all()
        calls = session.execute(
            select(Attempt.call_id, Attempt.infer_seconds).where(Attempt.started_at >= started)
        ).all()
    if not holds or any(released is None for _, released in holds):
        return {"slot_busy_fraction": None, "slot_holds": len(holds), "slot_held_seconds": None}
    first, last = min(a for a, _ in holds), max(r for _, r in holds)
    phase = (last - first).total_seconds()
    inferring = sum(dict(calls).values())  # one row per page of a call: count each call once
    held = sum((r - a).total_seconds() for a, r in holds)
    return {
        "slot_busy_fraction": inferring / phase if phase > 0 else None,
        "slot_holds": len(holds),
        "slot_held_seconds": held,
        "inference_phase_seconds": phase,
        "before_first_hold_seconds": (first - started).total_seconds(),
        "after_last_hold_seconds": (finished - last).total_seconds(),
    }


def _log_retries() -> None:
    """The slot's own debug log (each retry), and the Prefect client's (each request it makes
    again after a 503, with its back-off), join this variant's log file through the console
    handler Prefect's logging configuration gives them."""
    logging.getLogger("vramflow.tasks.gpu_slot").setLevel(logging.DEBUG)
    logging.getLogger("prefect.client").setLevel(logging.DEBUG)


def run_flow(args: argparse.Namespace, meter: CallMeter, page_count: int) -> dict[str, Any]:
    """Warm up on a one-page document, then time the flow (`process_pdf` over the benchmark
    document, or `sweep_inbox` over the folder of documents)."""
    from vramflow import pdf
    from vramflow.config import Settings
    from vramflow.flows.process_pdf import process_pdf
    from vramflow.flows.sweep_inbox import sweep_inbox

    common = {
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
    }
    _log_retries()
    # Like loading the model, starting the PDF worker processes is the process's, not the
    # document's: the warm-up's one page would start only one of them.
    pdf.start_workers()
    asyncio.run(process_pdf(str(warmup_pdf(args.home)), **common))
    meter.reset()
    PAGE_WORK.reset()
    with Sampler() as sampler:
        started, started_at = time.perf_counter(), datetime.now(timezone.utc)
        if args.variant == "sweep":
            summary = sweep_inbox(str(args.pdf), documents_at_once=args.documents_at_once, **common)
        else:
            summary = asyncio.run(process_pdf(str(args.pdf), **common))
        wall, finished_at = time.perf_counter() - started, datetime.now(timezone.utc)
    url = Settings().resolved_database_url
    done = _pages_done(url, started_at)
    if done != page_count:
        raise SystemExit(f"{args.variant} finished {done} of {page_count} pages: {summary}")
    slot = slot_figures(url, started_at, finished_at)
    if slot.get("before_first_hold_seconds") is not None:
        first_hold = started + slot["before_first_hold_seconds"]
        # Page work before the first hold is the first batch's extraction.
        slot["work_before_first_hold_seconds"] = PAGE_WORK.busy_between(started, first_hold)
        slot["phase_work_seconds"] = PAGE_WORK.busy_between(
            first_hold, started + wall - slot["after_last_hold_seconds"]
        )
    return {
        "wall_seconds": wall,
        "max_threads": sampler.max_threads,
        "rss_mib_profile": sampler.rss_profile(),
        "cpu_pressure": sampler.cpu_pressure,
        "database": url,
        **slot,
    }


def _pages_done(url: str, since: datetime) -> int:
    """Pages answered since `since` (the timed run's, not the warm-up's)."""
    from sqlalchemy import func, select

    from vramflow.db.models import Result
    from vramflow.db.session import session_scope

    with session_scope(url) as session:
        return session.scalar(
            select(func.count(Result.id)).where(
                Result.status == "ok", Result.infer_finished_at >= since
            )
        )


def run_plain(
    args: argparse.Namespace,
    meter: CallMeter,
    loaded: Any,
    device: str,
    pages: list[tuple[Path, int]],
):
    from vramflow import models

    models.move_model(loaded, device)
    _generate_one(loaded, DEMO_PAGES[0], device, args)
    meter.reset()
    PAGE_WORK.reset()
    run = run_sequential if args.variant == "sequential" else run_naive_async
    with Sampler() as sampler:
        started = time.perf_counter()
        answers = run(loaded, device, pages, args)
        wall = time.perf_counter() - started
    if len(answers) != len(pages):
        raise SystemExit(f"{args.variant} answered {len(answers)} of {len(pages)} pages")
    return {
        "wall_seconds": wall,
        "max_threads": sampler.max_threads,
        "rss_mib_profile": sampler.rss_profile(),
        "cpu_pressure": sampler.cpu_pressure,
        "database": None,
    }


def _measure_page_work() -> None:
    """Count vramflow's `generate_batch` as page work, where the flow and the loops call it, and
    the flow's page extraction: `pdf.extract_page`, a request to a PDF worker process, from the
    moment a task asks for a worker until the text is back."""
    from vramflow import inference, models, pdf

    measured = PAGE_WORK.wrap(models.generate_batch)
    models.generate_batch = inference.generate_batch = measured
    pdf.extract_page = PAGE_WORK.wrap(pdf.extract_page)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.home.mkdir(parents=True, exist_ok=True)
    _isolate(args)
    import torch

    from vramflow import gpu, models
    from vramflow.config import Settings

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pages = page_list(args.pdf)
    # Device and dtype as the flow resolves them: the loops run where the flow runs, and the
    # flow finds this copy of the weights in the process's cache.
    settings = Settings()
    device = gpu.resolve_device(settings.device)
    dtype = models.resolve_dtype(settings.dtype, device)
    loaded = models.load_model(args.model, args.model_cache_dir, dtype)
    meter = CallMeter()
    meter.install(loaded.model)
    _measure_page_work()
    if args.variant in ("flow", "sweep"):
        figures = run_flow(args, meter, len(pages))
    else:
        figures = run_plain(args, meter, loaded, device, pages)
    if meter.calls < 1:
        raise SystemExit("the model was never called")
    result = {
        "variant": args.variant,
        "pages": len(pages),
        "documents": len(pdf_files(args.pdf)),
        "documents_at_once": args.documents_at_once if args.variant == "sweep" else 1,
        "batch_size": args.batch_size if args.variant in ("flow", "sweep") else 1,
        "model_seconds": meter.busy_seconds,
        "work_seconds": PAGE_WORK.busy_seconds,
        "model_calls": meter.calls,
        "max_concurrent_calls": meter.max_concurrent,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_vram_bytes": meter.peak_vram_bytes,
        "device": f"{device_name()}, {str(dtype).removeprefix('torch.')}",
        "slot_busy_fraction": None,
        **figures,
    }
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
