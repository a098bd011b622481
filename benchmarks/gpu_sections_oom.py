"""gpu_check.py's out-of-memory section: a real CUDA out-of-memory error inside the flow.

A ballast tensor fills the card but for the weights and part of what a batch of 8 long pages
needs (measured first, in the same process); the flow runs with batch size 8, runs out of
memory, splits the batch, and must store every page. The stored attempts show outcome, pages
per call and VRAM figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpu_report import Check, equals
from gpu_support import Context, page_texts, run_child, say
from pages import build_page_set

from vramflow.config import DEFAULT_PROMPT, Settings

SECTION = "real OOM with ballast"
OOM_BATCH = 8
ESTIMATE_SECONDS = 70


def run(ctx: Context) -> tuple[list[Check], dict[str, Any]]:
    folder = ctx.work / "oom"
    folder.mkdir(parents=True, exist_ok=True)
    pdf, pages_from = build_page_set(folder, OOM_BATCH)
    say(f"{SECTION}: {pages_from}")
    spec = {
        "pdf": pdf,
        "model": ctx.model,
        "model_cache_dir": ctx.model_cache_dir,
        "max_new_tokens": ctx.max_new_tokens,
        "device": ctx.device,
    }
    result = run_child(ctx, "oom", "oom", spec, ctx.env(folder / "home"))
    return checks(result), result


def checks(result: dict[str, Any]) -> list[Check]:
    last = result["tries"][-1]
    calls = last["calls"]
    figures = all(
        c["torch_max_reserved_bytes"] and c["nvml_used_before_bytes"] and c["nvml_total_bytes"]
        for c in calls
    )
    split = any(c["outcome"] == "oom" for c in calls) and any(c["outcome"] == "ok" for c in calls)
    shape = ", ".join(f"{c['pages']} {c['outcome']}" for c in calls)
    return [
        equals(SECTION, f"a real CUDA OOM, then the batch split (calls: {shape})", split, True),
        equals(SECTION, "pages stored ok", last["pages_ok"], OOM_BATCH),
        equals(SECTION, "VRAM figures (torch peaks, NVML) stored for every call", figures, True),
    ]


def child(spec: dict[str, Any]) -> None:
    """Measure a batch's memory, fill the card with ballast, run the flow; retry with more or
    less room until a call runs out of memory and every page is stored (four tries at most)."""
    import torch

    from vramflow import models

    device = spec["device"]
    settings = Settings()
    dtype = models.resolve_dtype(settings.dtype, device)
    loaded = models.load_model(spec["model"], Path(spec["model_cache_dir"]), dtype)
    texts = page_texts(Path(spec["pdf"]), OOM_BATCH)
    weights, batch1, batch8 = _measure_batches(loaded, texts, device, settings)
    result: dict[str, Any] = {
        "weights_bytes": weights,
        "batch1_bytes": batch1,
        "batch8_bytes": batch8,
        "total_bytes": torch.cuda.mem_get_info(device)[1] if device.startswith("cuda") else 0,
        "tries": [],
    }
    # Room for the weights, one page, and a share of the gap between one page and eight: a
    # batch of 8 cannot fit, one page can. The allocator's rounding makes this approximate:
    # with no out-of-memory call, leave less room; with a page lost, more.
    share = 0.45
    for _ in range(4):
        room = weights + batch1 + int(share * (batch8 - batch1))
        attempt = _one_try(loaded, spec, settings, room, len(texts))
        result["tries"].append(attempt)
        if not any(call["outcome"] == "oom" for call in attempt["calls"]):
            share /= 3
        elif attempt["pages_ok"] < len(texts):
            share = (share + 1) / 2
        else:
            break
    Path(spec["out"]).write_text(json.dumps(result))


def _one_try(loaded: Any, spec: dict[str, Any], settings: Settings, room: int, pages: int):
    """The flow with all but `room` bytes of the card taken by ballast: its calls and pages."""
    import asyncio
    from datetime import datetime, timezone

    import torch
    from sqlalchemy import select

    from vramflow import gpu, models
    from vramflow.db.models import Attempt
    from vramflow.db.session import session_scope
    from vramflow.flows.process_pdf import process_pdf

    device = spec["device"]
    models.move_model(loaded, "cpu")  # the flow leaves the weights where it found them
    gpu.free_memory(device)
    # On a CPU (a rehearsal of the steps) there is no card to fill.
    free = torch.cuda.mem_get_info(device)[0] if device.startswith("cuda") else room
    ballast = torch.empty(max(0, free - room), dtype=torch.uint8, device=device)
    since = datetime.now(timezone.utc)
    try:
        asyncio.run(
            process_pdf(
                str(spec["pdf"]),
                batch_size=OOM_BATCH,
                model=spec["model"],
                max_new_tokens=spec["max_new_tokens"],
                pages=f"1-{pages}",
                force=True,
                return_state=True,
            )
        )
    finally:
        del ballast
        gpu.free_memory(device)
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(select(Attempt).where(Attempt.started_at >= since)).scalars()
        calls = _calls(sorted(rows, key=lambda row: row.started_at))
    ok = len({c["call_id"] for c in calls if c["outcome"] == "ok"})
    pages_ok = sum(c["pages"] for c in calls if c["outcome"] == "ok")
    return {"room_bytes": room, "pages_ok": pages_ok, "ok_calls": ok, "calls": calls}


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
                "call_id": row.call_id,
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
