"""throughput.py's report: the table of rows and the lines that say what the run was."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

# naive_async makes its own pressure (6 threads on the cores); the others should see almost none.
PRESSURE_WARNING = 0.2


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    gpu = any(row["peak_vram_bytes"] for row in rows)
    header = ["variant", "batch", "pages/s", "× sequential", "orchestration ms/page"]
    header += ["non-model ms/page", "peak RSS MiB"]
    header += ["peak VRAM MiB"] if gpu else []
    header += ["max concurrent calls", "slot busy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["name"],
            str(row["batch_size"]),
            fmt(row["pages_per_s"], ".3f"),
            fmt(row["ratio_to_sequential"], ".2f"),
            fmt(row["overhead_ms_per_page"], ".0f"),
            fmt(row["non_model_ms_per_page"], ".0f"),
            fmt(row["peak_rss_bytes"] / 2**20, ".0f"),
        ]
        if gpu:
            vram = row["peak_vram_bytes"]
            cells.append(fmt(vram / 2**20 if vram else None, ".0f"))
        cells += [str(row["max_concurrent_calls"]), fmt(row["slot_busy_fraction"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tokens_line(context: dict[str, Any]) -> str:
    """flow_tokens' budget, and the model calls it made against flow_best's."""
    return "flow_tokens: budget {} tokens ({}); model calls: flow_best {}, flow_tokens {}".format(
        *context["token_budget"], *context["model_calls"].values()
    )


def report(args: argparse.Namespace, rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    candidates = ", ".join(
        f"batch {size}: {rate:.3f} pages/s, slot busy {fmt(busy, '.2f')}"
        for size, rate, busy in context["candidates"]
    )
    return "\n".join(
        [
            f"command:  {shlex.join(['python', 'benchmarks/throughput.py', *args.argv])}",
            f"device:   {context['device']}",
            f"database: {context['database']}",
            f"prefect:  {context['prefect']}",
            f"pages:    {rows[0]['pages']} ({context['pages_from']}), prompt text cut to "
            f"{args.max_input_tokens} tokens, {args.max_new_tokens} new tokens, greedy",
            f"model:    {args.model}",
            "",
            table(rows),
            "",
            "sequential: {:.3f} pages/s before the other variants, {:.3f} after them; the "
            "row and every ratio use their mean".format(*context["sequential_runs"]),
            f"flow candidates: {candidates}",
            tokens_line(context),
            "fixed cost of the document (s before the first slot hold, of which extracting "
            "the first batch / after the last): "
            + ", ".join(
                f"{name} {fmt(before, '.2f')}, {fmt(extracting, '.2f')} / {fmt(after, '.2f')}"
                for name, before, extracting, after, _ in context["fixed"]
            ),
            "orchestration ms/page from the first slot hold to the last release (the fixed cost "
            "left out): "
            + ", ".join(
                f"{name} {fmt(in_phase, '.0f')}" for name, *_, in_phase in context["fixed"]
            ),
            "most threads seen, and CPU pressure (share of the run during which some task on",
            "this machine waited for a CPU; other work on the machine raises it):",
            "  "
            + ", ".join(
                f"{name} {threads} threads, {fmt(pressure, '.0%')}"
                for name, (threads, pressure) in context["runs"].items()
            ),
            *disturbed(context["runs"]),
        ]
    )


def disturbed(runs: dict[str, tuple[int, float | None]]) -> list[str]:
    """A warning naming the runs that other work on the machine slowed down."""
    hit = [
        name
        for name, (_, pressure) in runs.items()
        if name != "naive_async" and pressure is not None and pressure > PRESSURE_WARNING
    ]
    if not hit:
        return []
    return [
        f"warning: CPU pressure over {PRESSURE_WARNING:.0%} during {', '.join(hit)}: other work "
        "slowed those runs down; rerun before reading ratios"
    ]
