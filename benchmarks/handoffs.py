"""What happens between two batches on the GPU slot: a timeline of one `process_pdf` run.

    python benchmarks/handoffs.py --pages 16 --batch-size 1 --max-new-tokens 16
    python benchmarks/handoffs.py --pages 4 --max-new-tokens 2 --model ./tiny --timeline

throughput.py and paired.py give orchestration per page; this shows where it goes. The flow runs
once to warm up, then once over the benchmark pages, in this process, on a temporary Prefect
server, with wrappers on the functions a batch passes through: page extraction, the slot
(arriving at it, an acquisition from the server and each answer to it), the database writes of
the inference task, and `generate_batch`. It prints the gap between one generate call's end and
the next one's start (the hand-off, where the device idles), the time before the first call and
after the last, and how the slot was obtained; `--timeline` adds every recorded call.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from isolation import own_state  # noqa: E402
from pages import build_page_set, warmup_pdf  # noqa: E402
from server import temporary_prefect_server  # noqa: E402

from vramflow.config import DEFAULT_MODEL, Settings  # noqa: E402

Event = tuple[str, str, float, float]  # (what, thread, start, end) on time.perf_counter()


class Recorder:
    """Wraps module functions in place and records each call, from any thread."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def wrap(self, module: Any, name: str, label: str | None = None) -> None:
        function = getattr(module, name)

        @functools.wraps(function)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                event = (label or name, threading.current_thread().name, started)
                with self._lock:
                    self.events.append((*event, time.perf_counter()))

        setattr(module, name, recorded)

    def note(self, label: str) -> None:
        now = time.perf_counter()
        with self._lock:
            self.events.append((label, threading.current_thread().name, now, now))

    def clear(self) -> None:
        with self._lock:
            self.events.clear()


def instrument(recorder: Recorder) -> None:
    """Wrap what a batch goes through; the flow and its tasks look these up at call time."""
    from vramflow import inference, pdf
    from vramflow.tasks import engine_host, gpu_slot, infer

    recorder.wrap(inference, "generate_batch", "generate")
    recorder.wrap(pdf, "extract_page", "extract")
    recorder.wrap(infer, "_claim_pages", "claim pages")
    recorder.wrap(engine_host, "store_call", "store results")
    recorder.wrap(gpu_slot, "_wait_for", "wait at the slot")
    recorder.wrap(gpu_slot, "_acquire", "acquire from the server")
    recorder.wrap(gpu_slot, "_release", "release to the server")
    answer = gpu_slot._try_increment

    @functools.wraps(answer)
    def noted_answer(*args: Any, **kwargs: Any) -> Any:
        result = answer(*args, **kwargs)
        recorder.note("503" if result.busy else "granted" if result.granted else "taken")
        return result

    gpu_slot._try_increment = noted_answer


def summarize(events: list[Event], started: float, wall: float) -> dict[str, Any]:
    calls = sorted((s, e) for what, _, s, e in events if what == "generate")
    gaps = [1000 * (b[0] - a[1]) for a, b in itertools.pairwise(calls)]
    count = {what: sum(e[0] == what for e in events) for what in ("503", "granted", "taken")}
    return {
        "calls": len(calls),
        "wall_seconds": wall,
        "before_first_call_seconds": calls[0][0] - started if calls else None,
        "after_last_call_seconds": started + wall - calls[-1][1] if calls else None,
        "gaps_ms": gaps,
        "gap_median_ms": statistics.median(gaps) if gaps else None,
        "gap_mean_ms": statistics.fmean(gaps) if gaps else None,
        "gap_max_ms": max(gaps) if gaps else None,
        "acquired_from_server": count["granted"],
        "busy_answers": count["503"],
        "taken_answers": count["taken"],
    }


def report(summary: dict[str, Any], events: list[Event], started: float, timeline: bool) -> str:
    lines = [
        f"generate calls: {summary['calls']}, wall {summary['wall_seconds']:.2f} s",
        f"before the first call: {summary['before_first_call_seconds']:.3f} s, "
        f"after the last: {summary['after_last_call_seconds']:.3f} s",
        "gaps between calls (ms): " + ", ".join(f"{gap:.1f}" for gap in summary["gaps_ms"]),
    ]
    if summary["gaps_ms"]:
        lines.append(
            f"gap median {summary['gap_median_ms']:.1f} ms, mean {summary['gap_mean_ms']:.1f}, "
            f"max {summary['gap_max_ms']:.1f}"
        )
    lines.append(
        f"slot: {summary['acquired_from_server']} acquisition(s) from the server, "
        f"{summary['busy_answers']} busy (503) and {summary['taken_answers']} "
        "taken (423) answers"
    )
    if timeline:
        lines.append("\n   start ms     end ms  took ms  thread                       what")
        for what, thread, start, end in sorted(events, key=lambda e: e[2]):
            lines.append(
                f"{1000 * (start - started):10.1f} {1000 * (end - started):10.1f} "
                f"{1000 * (end - start):8.1f}  {thread[-28:]:28s} {what}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=16, help="pages to run (default 16)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-input-tokens", type=int, default=384)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--model-cache-dir", type=Path, default=Settings().model_cache_dir)
    parser.add_argument("--work-dir", type=Path, help="default: a temporary folder")
    parser.add_argument("--timeline", action="store_true", help="print every recorded call")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[Event], float]:
    from vramflow import gpu, models, torch_thread
    from vramflow.pdf import start_workers

    own_state(os.environ, work / "vramflow", VRAMFLOW_MAX_INPUT_TOKENS=str(args.max_input_tokens))
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    os.environ["VRAMFLOW_INFERENCE"] = "in-process"  # the engine in this process
    # Loaded here from --model-cache-dir, where the flow (which looks under its fresh home)
    # finds it in the process's cache, on the thread it uses for torch.
    settings = Settings()
    dtype = models.resolve_dtype(settings.dtype, gpu.resolve_device(settings.device))
    torch_thread.run(models.load_model, args.model, args.model_cache_dir, dtype)
    pdf, _ = build_page_set(work, args.pages)
    with temporary_prefect_server(work / "prefect-server") as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        from vramflow.flows.process_pdf import process_pdf

        recorder = Recorder()
        instrument(recorder)
        options = {
            "model": args.model,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
        }

        def run(path: Path) -> dict[str, Any]:
            return asyncio.run(process_pdf(str(path), **options))

        start_workers()  # the process's, like the model: see variants.run_flow
        run(warmup_pdf(work))
        recorder.clear()
        started = time.perf_counter()
        summary = run(pdf)
        wall = time.perf_counter() - started
    if summary["pages_ok"] != args.pages:
        raise SystemExit(f"the run answered {summary['pages_ok']} of {args.pages} pages")
    return summarize(recorder.events, started, wall), recorder.events, started


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        summary, events, started = measure(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="vramflow-handoffs-") as folder:
            summary, events, started = measure(args, Path(folder))
    if args.json:
        print(json.dumps(summary))
    else:
        print(report(summary, events, started, args.timeline))


if __name__ == "__main__":
    main(sys.argv[1:])
