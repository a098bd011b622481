"""Child of gpu_check.py: one page set through the flow in several batching variants and
through a plain batched loop, all in this one process.

The model is loaded once, the PDF workers started and the flow warmed up (static and
continuous) before any clock runs; each flow variant then gets a fresh SQLite database, so its
calls, slot holds and out-of-memory errors are its own. Variants are skipped, and say so, when
they would run past the deadline the parent gave.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gpu_support import call_figures, page_texts
from pages import warmup_pdf
from variants import slot_figures

from vramflow.config import DEFAULT_PROMPT, Settings

# Settings a variant may set; every other variant runs without them.
VARIANT_SETTINGS = ("VRAMFLOW_MAX_BATCH_TOKENS", "VRAMFLOW_CONTINUOUS_BATCHING")


class ContinuousCalls:
    """Counts the calls that went through continuous batching (vramflow.continuous)."""

    def __init__(self) -> None:
        from vramflow import continuous

        self.calls = 0
        original = continuous.generate_continuous

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        continuous.generate_continuous = counted


def child(spec: dict[str, Any]) -> None:
    """Run the variants of `spec` and write their figures to `spec["out"]`."""
    from vramflow import continuous, gpu, models, pdf

    home = Path(spec["home"])
    home.mkdir(parents=True, exist_ok=True)
    device = gpu.resolve_device(Settings().device)
    dtype = models.resolve_dtype(Settings().dtype, device)
    loaded = models.load_model(spec["model"], Path(spec["model_cache_dir"]), dtype)
    counter = ContinuousCalls()
    pdf.start_workers()
    for name, env in (("warm_static", {}), ("warm_continuous", {VARIANT_SETTINGS[1]: "true"})):
        _use_database(home, name, env)
        _run_document(warmup_pdf(home), 1, spec)
    flows = _run_flows(spec, counter)
    result = {
        "device": f"{device} ({_device_name(device)}), {str(dtype).removeprefix('torch.')}",
        "continuous_refusal": continuous.refusal(loaded, device),
        "flash_attention": _flash_attention(),
        "flows": flows,
        "loops": _run_loops(spec, loaded, device, flows),
    }
    Path(spec["out"]).write_text(json.dumps(result))


def _run_flows(spec: dict[str, Any], counter: ContinuousCalls) -> dict[str, Any]:
    """Each variant's figures, or why it was skipped."""
    flows: dict[str, Any] = {}
    pages = len(page_texts(Path(spec["pdf"])))
    for variant in spec["variants"]:
        need = pages / _expected_rate(variant, flows, spec)
        if time.time() + need > spec["deadline"]:
            flows[variant["name"]] = {"skipped": f"would take about {need:.0f} s, past the budget"}
            continue
        flows[variant["name"]] = _run_flow(variant, spec, counter)
    return flows


def _expected_rate(variant: dict[str, Any], flows: dict[str, Any], spec: dict[str, Any]) -> float:
    """Pages per second to expect: batch 1 from the hint (the first page set's), else from
    what ran so far (batch 1 at an eighth of the slowest), else fast enough to try."""
    rates = [f["pages_per_s"] for f in flows.values() if "pages_per_s" in f]
    if variant["batch_size"] == 1 and not variant["env"]:
        hint = spec.get("batch1_rate")
        return hint or (min(rates) / 8 if rates else 1.0)
    return min(rates) if rates else 1e9


def _run_flow(variant: dict[str, Any], spec: dict[str, Any], counter: ContinuousCalls):
    """The flow over the page set with this variant's batching, in a database of its own."""
    import torch

    url = _use_database(Path(spec["home"]), variant["name"], variant["env"])
    counter.calls = 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started_at, started = datetime.now(timezone.utc), time.perf_counter()
    _run_document(Path(spec["pdf"]), variant["batch_size"], spec)
    wall, finished_at = time.perf_counter() - started, datetime.now(timezone.utc)
    calls = call_figures(url)
    slot = slot_figures(url, started_at, finished_at)
    return {
        "batch_size": variant["batch_size"],
        "wall_seconds": wall,
        "pages_ok": calls["pages_ok"],
        "pages_per_s": calls["pages_ok"] / wall,
        "calls": calls["calls"],
        "oom_calls": calls["oom_calls"],
        "continuous_calls": counter.calls,
        "slot_busy_fraction": slot["slot_busy_fraction"],
        "before_first_hold_seconds": slot.get("before_first_hold_seconds"),
        "after_last_hold_seconds": slot.get("after_last_hold_seconds"),
        "peak_vram_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }


def _use_database(home: Path, name: str, env: dict[str, str]) -> str:
    """Point the next flow run at a fresh database, with only this variant's settings."""
    url = f"sqlite:///{home / f'{name}.db'}"
    for setting in VARIANT_SETTINGS:
        os.environ.pop(setting, None)
    os.environ.update(env, VRAMFLOW_DATABASE_URL=url)
    return url


def _run_document(path: Path, batch_size: int, spec: dict[str, Any]) -> None:
    """One process-pdf run; a run that ends Failed is counted from the database, not raised."""
    from vramflow.flows.process_pdf import process_pdf

    asyncio.run(
        process_pdf(
            str(path),
            model=spec["model"],
            max_new_tokens=spec["max_new_tokens"],
            batch_size=batch_size,
            return_state=True,
        )
    )


def _run_loops(
    spec: dict[str, Any], loaded: Any, device: str, flows: dict[str, Any]
) -> dict[str, Any]:
    """The plain loop with the batching of the fastest static flow, and of the continuous one."""
    from vramflow import continuous, models

    static = {n: f for n, f in flows.items() if n.startswith("static_") and "pages_per_s" in f}
    plans: list[tuple[str, int, Callable[..., Any]]] = []
    if static:
        best = max(static.values(), key=lambda f: f["pages_per_s"])["batch_size"]
        plans.append((f"static_{best}", best, models.generate_batch))
    if "pages_per_s" in flows.get("continuous", {}):
        plans.append(("continuous", spec["continuous_batch"], continuous.generate_continuous))
    loops = {}
    for name, batch, generate in plans:
        if time.time() > spec["deadline"]:
            loops[name] = {"skipped": "past the budget"}
            continue
        loops[name] = _run_loop(spec, loaded, device, batch, generate)
    return loops


def _run_loop(
    spec: dict[str, Any], loaded: Any, device: str, batch: int, generate: Callable[..., Any]
) -> dict[str, Any]:
    """pypdf and `generate` over consecutive pages, `batch` at a time: no Prefect, no slot."""
    from pypdf import PdfReader

    from vramflow import gpu, models, torch_thread

    reader = PdfReader(spec["pdf"])
    count = len(reader.pages)
    torch_thread.run(models.move_model, loaded, device)
    started = time.perf_counter()
    for first in range(0, count, batch):
        texts = [
            reader.pages[i].extract_text() or "" for i in range(first, min(count, first + batch))
        ]
        torch_thread.run(
            generate,
            loaded,
            DEFAULT_PROMPT,
            texts,
            device=device,
            max_new_tokens=spec["max_new_tokens"],
            max_input_tokens=int(os.environ["VRAMFLOW_MAX_INPUT_TOKENS"]),
            timeout_s=3600,
        )
    wall = time.perf_counter() - started
    torch_thread.run(models.move_model, loaded, "cpu")
    gpu.free_memory(device)
    return {"batch_size": batch, "wall_seconds": wall, "pages_per_s": count / wall}


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} torch threads"


def _flash_attention() -> str:
    """Which flash attention continuous batching can switch to (half precision on CUDA): with
    none it keeps sdpa, which needs attention masks, and so no CUDA graphs."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    found = [
        f"FA{v}"
        for v, ok in ((3, is_flash_attn_3_available()), (2, is_flash_attn_2_available()))
        if ok
    ]
    return ", ".join(found) or "none installed"
