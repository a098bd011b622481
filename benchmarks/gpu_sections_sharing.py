"""gpu_check.py's sharing section: two models of different sizes on one card under memory
admission (VRAMFLOW_ADMISSION=memory), with no out-of-memory error.

Two flow processes, one per model (the given one, and a larger Llama with random weights and the
same tokenizer, made here), each ask the device's slot for what their model needs (weights plus
the KV cache and activations of their calls, vramflow.admission). The device's size is set to
the two needs plus the margin, so both fit side by side and a third could not; on CUDA a ballast
tensor takes the rest of the card, so the grants are all the memory there is. The checks: no
call ran out of memory, every page was answered, and the two models did hold the card at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gpu_report import Check, equals, info
from gpu_support import (
    Child,
    Context,
    MiB,
    NvmlPeak,
    call_figures,
    most_at_once,
    nvml_memory,
    say,
    start_child,
    wait_for_file,
)
from pages import build_page_set

from vramflow.config import Settings

SECTION = "two models sharing the card"
ESTIMATE_SECONDS = 75
# Enough pages that each model holds the card for seconds: the two holds overlap.
PAGES, SMOKE_PAGES = 64, 3
BATCH = 16
# The larger model: a Llama of this shape (about 250M parameters with SmolLM2's vocabulary).
LARGER = {"hidden_size": 1024, "num_hidden_layers": 12, "intermediate_size": 2816}
SMOKE_LARGER = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128}


def run(ctx: Context) -> tuple[list[Check], dict[str, Any]]:
    folder = ctx.work / "sharing"
    folder.mkdir(parents=True, exist_ok=True)
    larger = build_larger_model(ctx, folder / "larger-model")
    pages = SMOKE_PAGES if ctx.smoke else PAGES
    started = []
    for name, model in (("given", ctx.model), ("larger", str(larger))):
        (folder / name).mkdir(exist_ok=True)
        pdf, _ = build_page_set(folder / name, pages)
        ready = folder / f"{name}.ready"
        spec = {"pdf": pdf, "model": model, "model_cache_dir": ctx.model_cache_dir}
        spec.update(ready=ready, go=folder / "go", device=ctx.device)
        env = ctx.env(
            folder / "home",  # one home: one slot, and its records, for both
            VRAMFLOW_ADMISSION="memory",
            VRAMFLOW_DATABASE_URL=f"sqlite:///{folder / f'{name}.db'}",
            VRAMFLOW_BATCH_SIZE=str(BATCH),
        )
        started.append((ready, start_child(ctx, "share", f"sharing-{name}", spec, env)))
    try:
        result = _share(ctx, folder, started)
    finally:
        for _, child in started:
            child.stop()
    return checks(result, 2 * pages), result


def _share(ctx: Context, folder: Path, started: list[tuple[Path, Child]]) -> dict[str, Any]:
    """Once both have loaded: ballast, then both go at once; their figures and the card's."""
    needs = []
    for ready, child in started:
        _wait_ready(ready, child)
        needs.append(json.loads(ready.read_text())["need_mib"])
    # The children's margin: their environment holds none of this one's VRAMFLOW_ settings.
    device_mib = sum(needs) + Settings.model_fields["memory_margin_mib"].default
    say(f"{SECTION}: needs {needs} MiB; device set to {device_mib} MiB")
    holder = _ballast(ctx, folder, device_mib) if ctx.cuda else None
    try:
        with NvmlPeak(ctx.cuda) as peak:
            (folder / "go").write_text(json.dumps({"device_memory_mib": device_mib}))
            reports = [child.finish(ctx.seconds_left() + 60) for _, child in started]
    finally:
        if holder is not None:
            (folder / "stop-ballast").touch()
            holder.finish(60)
    return {
        "needs_mib": needs,
        "device_mib": device_mib,
        "peak_used_bytes": peak.used,
        "total_bytes": nvml_memory()[1] if ctx.cuda else None,
        "runs": reports,
    }


def _wait_ready(ready: Path, child: Child, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if child.process.poll() is not None or time.monotonic() > deadline:
            child.finish(1)  # raises with its log
        time.sleep(0.1)


def _ballast(ctx: Context, folder: Path, leave_mib: int) -> Child:
    """A process holding all of the card but `leave_mib` MiB, once it holds it."""
    spec = {"device": ctx.device, "leave_bytes": leave_mib * MiB, "holding": folder / "holding"}
    spec["stop"] = folder / "stop-ballast"
    holder = start_child(ctx, "hold", "sharing-ballast", spec, ctx.env(folder / "ballast-home"))
    while not (folder / "holding").exists():
        if holder.process.poll() is not None:
            holder.finish(1)
        time.sleep(0.1)
    return holder


def checks(result: dict[str, Any], pages: int) -> list[Check]:
    runs = result["runs"]
    holds = [(a, r) for run in runs for _, a, r in run["holds"] if r is not None]
    grants = ", ".join(
        f"{run['model_name']} {need} MiB (peak reserved {_mib(run['peak_reserved_bytes'])})"
        for run, need in zip(runs, result["needs_mib"], strict=True)
    )
    return [
        info(SECTION, "grant per model (its peak reserved by torch)", grants),
        info(SECTION, "device size given to admission", f"{result['device_mib']} MiB"),
        info(
            SECTION,
            "card use at its peak, ballast included (NVML), of the card",
            f"{_mib(result['peak_used_bytes'] or None)} of {_mib(result['total_bytes'])}",
        ),
        equals(SECTION, "out-of-memory calls", sum(run["oom_calls"] for run in runs), 0),
        equals(SECTION, "pages ok", sum(run["pages_ok"] for run in runs), pages),
        equals(SECTION, "both models held the card at once", most_at_once(holds) >= 2, True),
    ]


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.0f} MiB"


def build_larger_model(ctx: Context, target: Path) -> Path:
    """A Llama larger than the given model, random weights, the given model's tokenizer (so
    the same pages give the same prompts); it always generates every new token."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vramflow import models

    if (target / "config.json").is_file():
        return target
    source, extra = models.resolve_source(ctx.model, ctx.model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    shape = SMOKE_LARGER if ctx.smoke else LARGER
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_attention_heads=max(2, shape["hidden_size"] // 64),
        num_key_value_heads=max(2, shape["hidden_size"] // 128),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def child(spec: dict[str, Any]) -> None:
    """Load the model, say what it needs, wait for the go, run the flow over the pages."""
    import asyncio
    import os

    import torch

    from vramflow import models
    from vramflow.flows.process_pdf import process_pdf
    from vramflow.tasks.engine_host import Grants

    settings, device = Settings(), spec["device"]
    loaded = models.load_model(
        spec["model"], Path(spec["model_cache_dir"]), models.resolve_dtype(settings.dtype, device)
    )
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context is on the card before the ballast
    need = Grants(settings, device).need(loaded)
    Path(spec["ready"]).write_text(json.dumps({"need_mib": need}))
    wait_for_file(Path(spec["go"]))
    go = json.loads(Path(spec["go"]).read_text())
    os.environ["VRAMFLOW_DEVICE_MEMORY_MIB"] = str(go["device_memory_mib"])
    started = time.perf_counter()
    asyncio.run(process_pdf(str(spec["pdf"]), model=spec["model"], return_state=True))
    figures = call_figures(Settings().resolved_database_url)
    peak = torch.cuda.max_memory_reserved(device) if device.startswith("cuda") else None
    report = {"model_name": Path(spec["model"]).name, "need_mib": need, "peak_reserved_bytes": peak}
    report.update(figures, wall_seconds=time.perf_counter() - started)
    Path(spec["out"]).write_text(json.dumps(report))


def hold(spec: dict[str, Any]) -> None:
    """Hold all but `leave_bytes` of the card until told to stop."""
    import torch

    torch.zeros(1, device=spec["device"])  # this process's own context first
    free = torch.cuda.mem_get_info(spec["device"])[0]
    ballast = torch.empty(
        max(0, free - spec["leave_bytes"]), dtype=torch.uint8, device=spec["device"]
    )
    Path(spec["holding"]).touch()
    wait_for_file(Path(spec["stop"]), timeout=3600)
    del ballast
    Path(spec["out"]).write_text(json.dumps({}))
