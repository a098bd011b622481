"""gpu_check.py's throughput section: static batches against token-budget and continuous
batching, each through the flow, and the flow against a plain batched loop.

For each page set (the throughput pages, then 128 pages) one child process runs, at the given
new tokens: the flow at static batch sizes (1, 8, 16, 32), with a token budget, and with
continuous batching; then the plain loop with the batching of the fastest static flow and of
the continuous one (gpu_throughput_runs.py). The checks: continuous or token-budget batching at
least 1.5 times the best static batch, the slot busy at least 0.95 of the inference phase in
the fastest flow, and the flow at least 0.9 times the loop with the same batching.
"""

from __future__ import annotations

import time
from typing import Any

from gpu_report import Check, at_least, equals, info
from gpu_support import Context, page_texts, run_child, say
from pages import build_page_set

from vramflow import batching
from vramflow.config import DEFAULT_PROMPT

STATIC_BATCHES = (8, 16, 32, 1)  # batch 1 last: it is the slowest, and the first to skip
SMOKE_BATCHES = (2, 1)
# Pages a token-budget call may hold at the page set's median length, and the pages each
# request of that flow carries (three requests wait at once, so the engine can choose).
TOKEN_BUDGET_PAGES, TOKEN_REQUEST_PAGES = 64, 32
# Pages of one continuous-batching call: no padding, so more pages only fill the steps.
CONTINUOUS_BATCH = 64
TARGETS = {"gain": 1.5, "slot_busy": 0.95, "flow_vs_loop": 0.9}


def page_counts(ctx: Context) -> list[int]:
    return [3] if ctx.smoke else [16, 128]


def estimate_seconds(ctx: Context, pages: int) -> float:
    """What a page set takes on an H100 with the 135M model, start-up included (generous)."""
    return 60 if ctx.smoke else 45 + 0.6 * pages


def variants(ctx: Context, pdf: Any) -> list[dict[str, Any]]:
    """The flow variants of a page set, in the order they run."""
    texts = page_texts(pdf)
    pages = len(texts)
    static = SMOKE_BATCHES if ctx.smoke else STATIC_BATCHES
    lengths = sorted(
        batching.estimate_tokens(text, DEFAULT_PROMPT, ctx.max_input_tokens) for text in texts
    )
    budget_pages = min(pages, 2 if ctx.smoke else TOKEN_BUDGET_PAGES)
    budget = batching.padded_cost([lengths[len(lengths) // 2]] * budget_pages, ctx.max_new_tokens)
    request_pages = min(pages, 2 if ctx.smoke else TOKEN_REQUEST_PAGES)
    tokens = {"VRAMFLOW_MAX_BATCH_TOKENS": str(budget)}
    return [
        *({"name": f"static_{b}", "batch_size": b, "env": {}} for b in static if b != 1),
        {"name": "token_budget", "batch_size": request_pages, "env": tokens},
        {
            "name": "continuous",
            "batch_size": continuous_batch(ctx, pages),
            "env": {"VRAMFLOW_CONTINUOUS_BATCHING": "true"},
        },
        *({"name": "static_1", "batch_size": 1, "env": {}} for b in static if b == 1),
    ]


def continuous_batch(ctx: Context, pages: int) -> int:
    return min(pages, CONTINUOUS_BATCH)


def run(ctx: Context, pages: int) -> tuple[list[Check], dict[str, Any]]:
    """One page set's child run and its checks."""
    section = f"throughput {pages} pages"
    folder = ctx.work / f"throughput-{pages}"
    folder.mkdir(parents=True, exist_ok=True)
    pdf, pages_from = build_page_set(folder, pages)
    say(f"{section}: {pages_from}")
    allowance = min(ctx.seconds_left(), 1.6 * estimate_seconds(ctx, pages))
    spec = {
        "pdf": pdf,
        "home": folder / "runs",
        "model": ctx.model,
        "model_cache_dir": ctx.model_cache_dir,
        "max_new_tokens": ctx.max_new_tokens,
        "variants": variants(ctx, pdf),
        "continuous_batch": continuous_batch(ctx, pages),
        "deadline": time.time() + allowance,
        "batch1_rate": ctx.facts.get("batch1_rate"),
    }
    result = run_child(ctx, "throughput", f"throughput-{pages}", spec, ctx.env(folder / "home"))
    result["pages_from"] = pages_from
    batch1 = result["flows"].get("static_1", {}).get("pages_per_s")
    ctx.facts.setdefault("batch1_rate", batch1)
    ctx.facts.setdefault("device_name", result["device"])
    return checks(section, result), result


def checks(section: str, result: dict[str, Any]) -> list[Check]:
    """The section's rows from the child's figures."""
    flows, loops = result["flows"], result["loops"]
    rate = {name: f.get("pages_per_s") for name, f in flows.items()}
    figures = " / ".join("-" if r is None else f"{r:.3g}" for r in rate.values())
    rows = [info(section, "pages/s: " + ", ".join(flows), figures), *_skips(section, flows, loops)]
    rows += _gains(section, rate)
    fastest = max((n for n in rate if rate[n]), key=rate.__getitem__, default=None)
    if fastest:
        rows.append(_fixed_cost(section, fastest, flows[fastest]))
    busy = flows[fastest]["slot_busy_fraction"] if fastest else None
    name = f"slot busy, fastest flow ({fastest})"
    rows.append(at_least(section, name, busy, TARGETS["slot_busy"]))
    for name, loop in loops.items():
        rows += _against_loop(section, name, flows[name], loop.get("pages_per_s"))
    ooms = sum(f.get("oom_calls", 0) for f in flows.values())
    rows.append(equals(section, "out-of-memory calls, every flow", ooms, 0))
    rows.append(_continuous_used(section, flows.get("continuous", {}), result))
    return rows


def _gains(section: str, rate: dict[str, float | None]) -> list[Check]:
    """Token-budget and continuous batching over the best static batch, and the check."""
    static = {n: r for n, r in rate.items() if n.startswith("static_") and r}
    best = max(static, key=static.__getitem__) if static else None
    gains = {
        name: rate[name] / static[best]
        for name in ("token_budget", "continuous")
        if best and rate.get(name)
    }
    rows = [info(section, f"{name} / {best}", f"{gain:.2f}") for name, gain in gains.items()]
    name = f"best of token_budget, continuous / best static ({best})"
    return [*rows, at_least(section, name, max(gains.values(), default=None), TARGETS["gain"])]


def _against_loop(
    section: str, name: str, flow: dict[str, Any], loop_rate: float | None
) -> list[Check]:
    """The flow's rate over the plain loop's with the same batching; and, for information, with
    the document's start and end (outside the slot) left out of the flow's time."""
    rate = flow.get("pages_per_s")
    ratio = rate / loop_rate if rate and loop_rate else None
    rows = [at_least(section, f"flow / plain loop, {name}", ratio, TARGETS["flow_vs_loop"])]
    fixed = (flow.get("before_first_hold_seconds") or 0) + (
        flow.get("after_last_hold_seconds") or 0
    )
    if ratio and fixed and flow["wall_seconds"] > fixed:
        phase = ratio * flow["wall_seconds"] / (flow["wall_seconds"] - fixed)
        rows.append(
            info(section, f"the same, from first slot hold to last ({name})", f"{phase:.2f}")
        )
    return rows


def _fixed_cost(section: str, name: str, flow: dict[str, Any]) -> Check:
    """The document's start and end outside the slot, which a plain loop does not pay."""
    before, after = flow.get("before_first_hold_seconds"), flow.get("after_last_hold_seconds")
    figure = "-" if before is None or after is None else f"{before:.2f} / {after:.2f}"
    return info(section, f"s before the first slot hold / after the last ({name})", figure)


def _continuous_used(section: str, flow: dict[str, Any], result: dict[str, Any]) -> Check:
    """Whether the continuous variant's calls went through continuous batching at all."""
    calls, total = flow.get("continuous_calls", 0), flow.get("calls", 0)
    refusal = result.get("continuous_refusal")
    check = Check(section, "continuous batching used by its flow", f"{calls} of {total} calls")
    check.target, check.passed = "> 0 calls", calls > 0
    if refusal:
        check.figure += f" (refused: {refusal})"
    else:
        check.figure += f"; flash attention: {result.get('flash_attention', '-')}"
    return check


def _skips(section: str, flows: dict[str, Any], loops: dict[str, Any]) -> list[Check]:
    runs = {**flows, **{f"loop {n}": loop for n, loop in loops.items()}}
    skipped = [f"{name} ({run['skipped']})" for name, run in runs.items() if "skipped" in run]
    return (
        [info(section, "skipped to stay within the time budget", "; ".join(skipped))]
        if skipped
        else []
    )
