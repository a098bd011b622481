"""Checks that need a CUDA card, run once on a GPU machine; the CPU tests cannot make them.

    python benchmarks/gpu_check.py [--model SPEC] [--work-dir DIR] [--json FILE]

1. oom_split: a real CUDA out-of-memory error inside vramflow's flow. A ballast tensor fills the
   card but for the weights and part of what a batch of 8 long pages needs (measured first, in the
   same process); the flow runs with batch size 8, runs out of memory, splits the batch, and must
   store every page. The stored attempts show outcome, pages per call and VRAM figures.
2. ballast: three processes each need a large ballast allocation (--ballast-fraction of the card)
   plus the weights for every batch of pages, and start at the same moment: once holding
   vramflow's GPU slot (ballast and weights on the card only while held), once without it.

All processes share one Prefect server started here and one vramflow home. Exit status 0 when the
flow hit at least one out-of-memory call and stored every page, with non-null VRAM figures; with
the slot no process ran out of memory and no two held ballast at once; and without the slot at
least one did run out of memory (else the check proves nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from isolation import own_state  # noqa: E402
from pages import build_page_set  # noqa: E402
from server import temporary_prefect_server  # noqa: E402
from throughput import say, work_folder  # noqa: E402

from vramflow.config import DEFAULT_MODEL, DEFAULT_PROMPT, Settings  # noqa: E402

MiB, GiB = 2**20, 2**30
OOM_BATCH = 8
WORKERS = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="main", choices=["main", "oom", "worker"])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--model-cache-dir", type=Path, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--ballast-fraction",
        type=float,
        default=0.6,
        help="share of the card each ballast process needs (default 0.6: two cannot fit)",
    )
    parser.add_argument("--pages-per-worker", type=int, default=6)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--device", default="cuda:0", help="cpu runs the steps without ballast (a dry run)"
    )
    # Set by the main role for its children.
    parser.add_argument("--pdf", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--go", type=Path)
    parser.add_argument("--ballast-bytes", type=int, default=0)
    parser.add_argument("--no-slot", action="store_true")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- 1. a real OOM inside the flow


def oom_split(args: argparse.Namespace) -> None:
    """Child process: measure a batch's memory, fill the card with ballast, run the flow."""
    import torch
    from sqlalchemy import select
    from vramflow.flows.process_pdf import process_pdf

    from vramflow import gpu, models
    from vramflow.db.models import Attempt
    from vramflow.db.session import session_scope

    device, cuda = args.device, args.device.startswith("cuda")
    settings = Settings()
    dtype = models.resolve_dtype(settings.dtype, device)
    loaded = models.load_model(args.model, args.model_cache_dir, dtype)  # the flow's copy too
    texts = _page_texts(args.pdf, OOM_BATCH)
    weights, batch1, batch8 = _measure_batches(loaded, texts, device, settings)
    total = torch.cuda.mem_get_info(device)[1] if cuda else 0
    result: dict[str, Any] = {
        "weights_bytes": weights,
        "batch1_bytes": batch1,
        "batch8_bytes": batch8,
        "total_bytes": total,
        "tries": [],
    }
    # Leave room for the weights, one page, and a share of the gap between one page and eight:
    # a batch of 8 cannot fit, one page can. The allocator's rounding makes this approximate:
    # with no out-of-memory call, leave less room; with a page lost, more.
    share = 0.45
    for _ in range(4):
        room = weights + batch1 + int(share * (batch8 - batch1))
        models.move_model(loaded, "cpu")  # the flow leaves the weights where it found them
        gpu.free_memory(device)
        free = torch.cuda.mem_get_info(device)[0] if cuda else room
        ballast = torch.empty(free - room, dtype=torch.uint8, device=device)
        try:
            summary = asyncio.run(
                process_pdf(
                    str(args.pdf),
                    batch_size=OOM_BATCH,
                    model=args.model,
                    max_new_tokens=args.max_new_tokens,
                    pages=f"1-{len(texts)}",
                    force=True,
                )
            )
        finally:
            del ballast
            gpu.free_memory(device)
        with session_scope(settings.resolved_database_url) as session:
            rows = session.execute(
                select(Attempt)
                .where(Attempt.flow_run_id == str(summary["flow_run_id"]))
                .order_by(Attempt.started_at)
            ).scalars()
            calls = _calls(rows)
        result["tries"].append(
            {"room_bytes": room, "pages_ok": summary["pages_ok"], "calls": calls}
        )
        if not any(call["outcome"] == "oom" for call in calls):
            share /= 3
        elif summary["pages_ok"] < len(texts):
            share = (share + 1) / 2
        else:
            break
    args.out.write_text(json.dumps(result))


def _measure_batches(loaded: Any, texts: list[str], device: str, settings: Settings):
    """Bytes the caching allocator reserves for the weights, and on top for 1 and 8 pages."""
    import torch

    from vramflow import gpu, models

    if not device.startswith("cuda"):
        return 0, 0, 0

    def generate(pages: list[str]) -> None:
        models.generate_batch(
            loaded,
            DEFAULT_PROMPT,
            pages,
            device=device,
            max_new_tokens=settings.max_new_tokens,
            max_input_tokens=settings.max_input_tokens,
            timeout_s=600,
        )

    models.move_model(loaded, device)
    generate(texts[:1])  # warm-up: kernels, cuBLAS workspace
    gpu.free_memory(device)
    weights = torch.cuda.memory_reserved(device)
    peaks = []
    for count in (1, OOM_BATCH):
        gpu.free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
        generate(texts[:count])
        peaks.append(torch.cuda.max_memory_reserved(device) - weights)
    models.move_model(loaded, "cpu")
    gpu.free_memory(device)
    return weights, peaks[0], peaks[1]


def _calls(rows: Any) -> list[dict[str, Any]]:
    """One entry per model call (the attempts table has one row per page of a call)."""
    calls: dict[str, dict[str, Any]] = {}
    for row in rows:
        call = calls.setdefault(
            row.call_id,
            {
                "outcome": row.outcome,
                "pages": 0,
                "error": (row.error_message or "")[:160],
                "torch_max_allocated_bytes": row.torch_max_allocated_bytes,
                "torch_max_reserved_bytes": row.torch_max_reserved_bytes,
                "nvml_used_before_bytes": row.nvml_used_before_bytes,
                "nvml_used_after_bytes": row.nvml_used_after_bytes,
                "nvml_total_bytes": row.nvml_total_bytes,
                "infer_seconds": row.infer_seconds,
            },
        )
        call["pages"] += 1
    return list(calls.values())


# ------------------------------------------------------- 2. three processes with large ballast


def worker(args: argparse.Namespace) -> None:
    """Child process: for each batch of 2 pages take ballast and weights, generate, give back."""
    from vramflow.tasks.gpu_slot import gpu_slot

    from vramflow import gpu, models
    from vramflow.inference import GenerationSettings, PageInput

    settings = Settings()
    device = args.device
    loaded = models.load_model(
        args.model, args.model_cache_dir, models.resolve_dtype(settings.dtype, device)
    )
    texts = _page_texts(args.pdf, args.pages_per_worker)
    pages = [PageInput(number, text) for number, text in enumerate(texts, start=1)]
    cfg = GenerationSettings(
        DEFAULT_PROMPT, device, args.max_new_tokens, settings.max_input_tokens, 600
    )
    name = gpu.slot_name(settings.slot_name_template, device)
    say("waiting for go")  # the parent lets every worker go at once when all have said this
    _wait_for(args.go)
    batches = []
    for start in range(0, len(pages), 2):
        slot = (
            nullcontext()
            if args.no_slot
            else gpu_slot(
                name,
                lease_seconds=settings.slot_lease_seconds,
                records_dir=settings.slot_records_dir,
            )
        )
        with slot:
            batches.append(_one_batch(loaded, pages[start : start + 2], cfg, args.ballast_bytes))
    args.out.write_text(json.dumps({"pid": os.getpid(), "batches": batches}))


def _one_batch(loaded: Any, pages: list[Any], cfg: Any, ballast_bytes: int) -> dict[str, Any]:
    """Ballast, weights, generate, then all of it off the card; OOM anywhere is counted."""
    import torch

    from vramflow import gpu, models
    from vramflow.inference import run_batch

    entry: dict[str, Any] = {"pages": len(pages), "ok": 0, "ooms": 0, "error": None}
    ballast = None
    try:
        ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device=cfg.device)
        entry["ballast_from"] = time.monotonic()
        models.move_model(loaded, cfg.device)
        outcome = run_batch(loaded, pages, cfg)
        entry["ok"] = len(outcome.done)
        entry["ooms"] = sum(1 for call in outcome.failed.values() if call.outcome == "oom")
    except Exception as exc:
        if not gpu.is_oom(exc):
            raise
        entry["ooms"] += 1
        entry["error"] = str(exc).splitlines()[0][:160]
    finally:
        if ballast is not None:
            del ballast
            entry["ballast_until"] = time.monotonic()
        models.move_model(loaded, "cpu")
        gpu.free_memory(cfg.device)
    return entry


def _page_texts(path: Path, count: int) -> list[str]:
    """Text of the first `count` pages (only those are extracted)."""
    from pypdf import PdfReader

    return [page.extract_text() for page in PdfReader(path).pages[:count]]


def _wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no go file {path} within {timeout:g} s")
        time.sleep(0.005)


def ballast_round(args: argparse.Namespace, work: Path, env: dict[str, str], slot: bool):
    """Start three workers, let them go at once, return their reports and the device's peak."""
    label = "slot" if slot else "no_slot"
    go = work / f"go-{label}"
    total = _nvml_total() if args.device.startswith("cuda") else 0
    ballast = int(args.ballast_fraction * total)
    children = []
    with ExitStack() as logs:
        for index in range(WORKERS):
            out = work / f"{label}-{index}.json"
            command = [
                *_child(args, "worker"),
                "--out",
                str(out),
                "--go",
                str(go),
                "--ballast-bytes",
                str(ballast),
                "--pages-per-worker",
                str(args.pages_per_worker),
                *([] if slot else ["--no-slot"]),
            ]
            log = logs.enter_context(open(work / f"{label}-{index}.log", "wb"))
            children.append((subprocess.Popen(command, env=env, stdout=log, stderr=log), out))
        _wait_until_loaded(work, label, [process for process, _ in children])
        with NvmlPeak(args.device) as peak:
            go.touch()
            for process, _ in children:
                process.wait()
    reports = []
    for index, (process, out) in enumerate(children):
        if process.returncode != 0:
            tail = (work / f"{label}-{index}.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"worker {label}-{index} failed ({process.returncode}):\n{tail}")
        reports.append(json.loads(out.read_text()))
    return {
        "slot": slot,
        "ballast_bytes": ballast,
        "total_bytes": total,
        "peak_used_bytes": peak.used,
        "max_ballast_at_once": _most_at_once(reports),
        "workers": reports,
    }


def _wait_until_loaded(work: Path, label: str, processes: list[subprocess.Popen]) -> None:
    """Wait until every worker logged that it waits for the go file (or died)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        logs = [(work / f"{label}-{i}.log").read_text(errors="replace") for i in range(WORKERS)]
        if all("waiting for go" in text for text in logs):
            return
        for process in processes:
            if process.poll() is not None:
                return  # reported with its log by the caller
        time.sleep(0.2)
    raise SystemExit("workers did not load their model within 600 s")


def _most_at_once(reports: list[dict[str, Any]]) -> int:
    """Most ballast allocations on the card at the same time, from the workers' intervals."""
    edges = []
    for report in reports:
        for batch in report["batches"]:
            if "ballast_from" in batch:
                edges += [(batch["ballast_from"], 1), (batch["ballast_until"], -1)]
    most = now = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        now += step
        most = max(most, now)
    return most


def _nvml_total() -> int:
    import pynvml

    pynvml.nvmlInit()
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)


class NvmlPeak:
    """Samples the card's used memory (all processes) every 20 ms in a thread."""

    def __init__(self, device: str) -> None:
        self._cuda = device.startswith("cuda")
        self.used = 0

    def __enter__(self) -> NvmlPeak:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._cuda:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import pynvml

        while not self._stop.wait(0.02):
            self.used = max(self.used, int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# ------------------------------------------------------------------------------ orchestration


def _child(args: argparse.Namespace, role: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        role,
        "--model",
        args.model,
        "--pdf",
        str(args.pdf),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--model-cache-dir",
        str(args.model_cache_dir),
        "--device",
        args.device,
    ]


def main_role(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    args.pdf, pages_from = build_page_set(work, max(OOM_BATCH, args.pages_per_worker))
    say(f"pages: {pages_from}")
    env = dict(os.environ)
    own_state(env, work / "vramflow")
    env.update(
        VRAMFLOW_MAX_INPUT_TOKENS="384",
        VRAMFLOW_MAX_NEW_TOKENS=str(args.max_new_tokens),
        VRAMFLOW_DEVICE=args.device,
        VRAMFLOW_INFERENCE="in-process",  # the engine in the flow's process, on this server
        PYTHONUNBUFFERED="1",
    )
    with temporary_prefect_server(work / "prefect-server") as api_url:
        env["PREFECT_API_URL"] = api_url
        say("1. out of memory inside the flow ...")
        out = work / "oom.json"
        with open(work / "oom.log", "wb") as log:
            code = subprocess.run(
                [*_child(args, "oom"), "--out", str(out)], env=env, stdout=log, stderr=log
            ).returncode
        if code != 0:
            tail = (work / "oom.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"the OOM check failed ({code}):\n{tail}")
        oom = json.loads(out.read_text())
        say("2. three ballast processes with the slot ...")
        with_slot = ballast_round(args, work, env, slot=True)
        say("   ... and without it")
        without = ballast_round(args, work, env, slot=False)
    return {"oom_split": oom, "ballast": [with_slot, without]}


def verdicts(results: dict[str, Any], pages_per_worker: int) -> list[tuple[str, bool]]:
    oom = results["oom_split"]
    last = oom["tries"][-1]
    calls = last["calls"]
    figures_ok = all(
        call["torch_max_reserved_bytes"]
        and call["nvml_used_before_bytes"]
        and call["nvml_total_bytes"]
        for call in calls
    )
    with_slot, without = results["ballast"]

    def ooms(round_: dict[str, Any]) -> int:
        return sum(b["ooms"] for w in round_["workers"] for b in w["batches"])

    def ok_pages(round_: dict[str, Any]) -> int:
        return sum(b["ok"] for w in round_["workers"] for b in w["batches"])

    return [
        (
            "flow: a real CUDA OOM was raised and the batch split",
            any(c["outcome"] == "oom" for c in calls) and any(c["outcome"] == "ok" for c in calls),
        ),
        ("flow: every page stored ok", last["pages_ok"] == OOM_BATCH),
        ("flow: VRAM figures (torch peaks, NVML) stored for every call", figures_ok),
        (
            "with the slot: no OOM, every page ok",
            ooms(with_slot) == 0 and ok_pages(with_slot) == WORKERS * pages_per_worker,
        ),
        (
            "with the slot: at most one ballast on the card at a time",
            with_slot["max_ballast_at_once"] <= 1,
        ),
        ("without the slot: out of memory (the control)", ooms(without) > 0),
    ]


def report(results: dict[str, Any], checks: list[tuple[str, bool]]) -> str:
    oom = results["oom_split"]
    lines = [
        "1. out of memory inside the flow (batch size 8, ballast leaves room for part of it)",
        f"   measured: weights {oom['weights_bytes'] / MiB:.0f} MiB, one page +"
        f"{oom['batch1_bytes'] / MiB:.0f} MiB, eight pages +{oom['batch8_bytes'] / MiB:.0f} MiB"
        f" (caching allocator, reserved); card {oom['total_bytes'] / GiB:.1f} GiB",
    ]
    for number, attempt in enumerate(oom["tries"], start=1):
        lines.append(
            f"   try {number}: room {attempt['room_bytes'] / MiB:.0f} MiB, "
            f"pages ok {attempt['pages_ok']}"
        )
        lines.append(
            "   | call | pages | outcome | torch max alloc MiB | torch max reserved MiB "
            "| NVML used before GiB | NVML used after GiB | NVML total GiB | s |"
        )
        for index, call in enumerate(attempt["calls"], start=1):
            lines.append(
                f"   | {index} | {call['pages']} | {call['outcome']} "
                f"| {_mib(call['torch_max_allocated_bytes'])} "
                f"| {_mib(call['torch_max_reserved_bytes'])} "
                f"| {_gib(call['nvml_used_before_bytes'])} | {_gib(call['nvml_used_after_bytes'])} "
                f"| {_gib(call['nvml_total_bytes'])} | {call['infer_seconds']:.2f} |"
            )
        errors = {call["error"] for call in attempt["calls"] if call["error"]}
        lines += [f"   error stored: {error}" for error in sorted(errors)]
    lines.append("")
    lines.append(f"2. {WORKERS} processes, each with ballast + weights per batch of 2 pages")
    lines.append(
        "   | slot | ballast GiB each | pages ok | OOMs | most ballasts at once "
        "| peak card use GiB (NVML) |"
    )
    for round_ in results["ballast"]:
        batches = [b for w in round_["workers"] for b in w["batches"]]
        lines.append(
            f"   | {'yes' if round_['slot'] else 'no'} | {round_['ballast_bytes'] / GiB:.1f} "
            f"| {sum(b['ok'] for b in batches)} of {sum(b['pages'] for b in batches)} "
            f"| {sum(b['ooms'] for b in batches)} | {round_['max_ballast_at_once']} "
            f"| {round_['peak_used_bytes'] / GiB:.1f} of {round_['total_bytes'] / GiB:.1f} |"
        )
        errors = {b["error"] for b in batches if b["error"]}
        lines += [f"   error: {error}" for error in sorted(errors)]
    lines.append("")
    lines += [f"{'PASS' if passed else 'FAIL'}  {name}" for name, passed in checks]
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.model_cache_dir = args.model_cache_dir or Settings().model_cache_dir
    if args.role == "oom":
        oom_split(args)
        return
    if args.role == "worker":
        worker(args)
        return
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (--device cpu: a dry run of the steps)")
    with work_folder(args.work_dir, "vramflow-gpu-check-") as folder:
        results = main_role(args, Path(folder))
    checks = verdicts(results, args.pages_per_worker)
    print(report(results, checks))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "checks": checks}, indent=2))
    sys.exit(0 if all(passed for _, passed in checks) else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
