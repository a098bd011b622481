"""gpu_check.py's slot section: three processes that each need most of the card.

Each process needs a ballast allocation of `BALLAST_FRACTION` of the card plus the weights for
every batch of 2 pages, and all three start at the same moment: once holding vramflow's GPU
slot (ballast and weights on the card only while held), once without it. With the slot no
process may run out of memory and no two may hold ballast at once; without it at least one must
run out of memory, or the check proves nothing.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from gpu_report import Check, at_least, equals
from gpu_support import (
    Child,
    Context,
    NvmlPeak,
    most_at_once,
    nvml_memory,
    page_texts,
    say,
    start_child,
    wait_for_file,
)
from pages import build_page_set

from vramflow.config import DEFAULT_PROMPT, Settings

SECTION = "slot: 3 processes, ballast 0.6 of the card each"
PROCESSES = 3
PAGES_PER_PROCESS = 6
BALLAST_FRACTION = 0.6  # two cannot fit
ESTIMATE_SECONDS = 80


def run(ctx: Context) -> tuple[list[Check], dict[str, Any]]:
    folder = ctx.work / "slot"
    folder.mkdir(parents=True, exist_ok=True)
    pdf, _ = build_page_set(folder, PAGES_PER_PROCESS)
    say(f"{SECTION}: with the slot ...")
    with_slot = _round(ctx, folder, pdf, slot=True)
    say(f"{SECTION}: ... and without it")
    without = _round(ctx, folder, pdf, slot=False)
    return checks(with_slot, without), {"with_slot": with_slot, "without_slot": without}


def checks(with_slot: dict[str, Any], without: dict[str, Any]) -> list[Check]:
    def ooms(round_: dict[str, Any]) -> int:
        return sum(b["ooms"] for w in round_["workers"] for b in w["batches"])

    def ok_pages(round_: dict[str, Any]) -> int:
        return sum(b["ok"] for w in round_["workers"] for b in w["batches"])

    return [
        equals(SECTION, "with the slot: out-of-memory errors", ooms(with_slot), 0),
        equals(
            SECTION, "with the slot: pages ok", ok_pages(with_slot), PROCESSES * PAGES_PER_PROCESS
        ),
        Check(
            SECTION,
            "with the slot: most ballasts on the card at once",
            str(with_slot["max_ballast_at_once"]),
            "<= 1",
            with_slot["max_ballast_at_once"] <= 1,
        ),
        at_least(
            SECTION, "without the slot: out-of-memory errors (the control)", ooms(without), 1, "d"
        ),
    ]


def _round(ctx: Context, folder: Path, pdf: Path, slot: bool) -> dict[str, Any]:
    """Start the processes, let them go at once, return their reports and the card's peak."""
    label = "slot" if slot else "no_slot"
    go = folder / f"go-{label}"
    total = nvml_memory()[1] if ctx.cuda else 0  # a CPU rehearsal: no ballast
    ballast = int(BALLAST_FRACTION * total)
    spec = {
        "pdf": pdf,
        "model": ctx.model,
        "model_cache_dir": ctx.model_cache_dir,
        "max_new_tokens": ctx.max_new_tokens,
        "device": ctx.device,
        "go": go,
        "ballast_bytes": ballast,
        "slot": slot,
    }
    env = ctx.env(folder / "home")  # one home: the processes share the slot's records
    children = [
        start_child(ctx, "ballast", f"slot-{label}-{i}", spec, env) for i in range(PROCESSES)
    ]
    try:
        _wait_until_loaded(children)
        with NvmlPeak(ctx.cuda) as peak:
            go.touch()
            reports = [child.finish(ctx.seconds_left() + 60) for child in children]
    finally:
        for child in children:
            child.stop()
    intervals = [
        (b["ballast_from"], b["ballast_until"])
        for r in reports
        for b in r["batches"]
        if "ballast_from" in b
    ]
    return {
        "slot": slot,
        "ballast_bytes": ballast,
        "total_bytes": total,
        "peak_used_bytes": peak.used,
        "max_ballast_at_once": most_at_once(intervals),
        "workers": reports,
    }


def _wait_until_loaded(children: list[Child], timeout: float = 600) -> None:
    """Until every process logged that it waits for the go file (or one died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all("waiting for go" in c.log.read_text(errors="replace") for c in children):
            return
        if any(c.process.poll() is not None for c in children):
            return  # its log is reported when it is finished
        time.sleep(0.2)
    raise TimeoutError(f"the processes did not load their model within {timeout:g} s")


def child(spec: dict[str, Any]) -> None:
    """One process: for each batch of 2 pages take ballast and weights, generate, give back."""
    from vramflow import gpu, models
    from vramflow.inference import GenerationSettings, PageInput
    from vramflow.tasks.gpu_slot import gpu_slot

    settings, device = Settings(), spec["device"]
    dtype = models.resolve_dtype(settings.dtype, device)
    loaded = models.load_model(spec["model"], Path(spec["model_cache_dir"]), dtype)
    texts = page_texts(Path(spec["pdf"]), PAGES_PER_PROCESS)
    pages = [PageInput(number, text) for number, text in enumerate(texts, start=1)]
    cfg = GenerationSettings(
        DEFAULT_PROMPT, device, spec["max_new_tokens"], settings.max_input_tokens, 600
    )
    name = gpu.slot_name(settings.slot_name_template, device)
    print("waiting for go", flush=True)  # the parent lets every process go at once
    wait_for_file(Path(spec["go"]))
    batches = []
    for start in range(0, len(pages), 2):
        slot = (
            gpu_slot(
                name,
                lease_seconds=settings.slot_lease_seconds,
                records_dir=settings.slot_records_dir,
            )
            if spec["slot"]
            else nullcontext()
        )
        with slot:
            batches.append(_one_batch(loaded, pages[start : start + 2], cfg, spec["ballast_bytes"]))
    Path(spec["out"]).write_text(json.dumps({"batches": batches}))


def _one_batch(loaded: Any, pages: list[Any], cfg: Any, ballast_bytes: int) -> dict[str, Any]:
    """Ballast, weights, generate, then all of it off the card; OOM anywhere is counted."""
    import torch

    from vramflow import gpu, models
    from vramflow.inference import run_batch

    entry: dict[str, Any] = {"pages": len(pages), "ok": 0, "ooms": 0, "error": None}
    ballast = None
    try:
        ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device=cfg.device)
        entry["ballast_from"] = time.time()
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
            entry["ballast_until"] = time.time()
        models.move_model(loaded, "cpu")
        gpu.free_memory(cfg.device)
    return entry
