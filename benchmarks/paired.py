"""The plain loop and the flow at batch size 1, run in turn several times: is the gap real?

    python benchmarks/paired.py --pages 16 --pairs 3 --max-new-tokens 64
    python benchmarks/paired.py --pages 2 --pairs 1 --max-new-tokens 2 --model ./tiny --json

throughput.py runs each variant once, and on a shared 2-core machine two runs of the same loop
a few minutes apart differ by up to 15 %: a single ratio near 0.9 cannot tell the flow's cost
from the machine's drift. Here the sequential loop and `process_pdf` at batch size 1 alternate
(loop, flow, loop, ..., loop) on the same pages, each in a fresh interpreter as in
throughput.py, on one temporary Prefect server (or `--prefect-api-url`). Every flow run is
compared with the mean of the loop runs just before and after it, and the model's own time
(`generate`) is compared the same way: a flow that only adds orchestration shows a model-time
ratio near 1 and a rate ratio a little below. Orchestration is the flow's wall time minus its
page work (extraction and `generate_batch`), per page, as in throughput.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from pages import build_page_set  # noqa: E402
from variant_runs import (  # noqa: E402
    add_output_options,
    add_variant_options,
    flow_server,
    mean_of_runs,
    run_variant,
    to_row,
    work_folder,
)

from vramflow.config import Settings  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=16, help="pages to run (default 16)")
    parser.add_argument("--pairs", type=int, default=3, help="flow runs (default 3)")
    add_variant_options(parser)
    add_output_options(parser)
    return parser.parse_args(argv)


def pair_rows(loops: list[dict[str, Any]], flows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per flow run, against the mean of the loop runs on either side of it."""
    rows = []
    for number, flow in enumerate(flows, start=1):
        before, after = loops[number - 1], loops[number]
        loop = mean_of_runs(before, after)
        row = to_row("flow_batch1", flow, loop["pages"] / loop["wall_seconds"])
        rows.append(
            {
                "pair": number,
                "sequential_pages_per_s": [
                    before["pages"] / before["wall_seconds"],
                    after["pages"] / after["wall_seconds"],
                ],
                "flow_pages_per_s": row["pages_per_s"],
                "ratio": row["ratio_to_sequential"],
                "model_time_ratio": flow["model_seconds"] / loop["model_seconds"],
                "flow_overhead_ms_per_page": row["overhead_ms_per_page"],
                "flow_non_model_ms_per_page": row["non_model_ms_per_page"],
                "flow_cpu_pressure": flow["cpu_pressure"],
            }
        )
    return rows


def measure(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    args.pdf, _ = build_page_set(work, args.pages)
    flows = []
    # The server is up (and idle) during the loop runs too: only the flow's use of it differs.
    with flow_server(work, args.prefect_api_url) as server:
        loops = [run_variant("sequential", work, "sequential_0", args, [])]
        for number in range(1, args.pairs + 1):
            extra = [*server, "--batch-size", "1"]
            flows.append(run_variant("flow", work, f"flow_batch1_{number}", args, extra))
            loops.append(run_variant("sequential", work, f"sequential_{number}", args, []))
    return pair_rows(loops, flows)


def table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"$ python benchmarks/paired.py {shlex.join(args.argv)}",
        "",
        "| pair | sequential pages/s (before / after) | flow batch 1 pages/s | ratio "
        "| model time, flow / loop | flow orchestration ms/page | flow non-model ms/page |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        before, after = row["sequential_pages_per_s"]
        lines.append(
            f"| {row['pair']} | {before:.3f} / {after:.3f} | {row['flow_pages_per_s']:.3f} "
            f"| {row['ratio']:.2f} | {row['model_time_ratio']:.2f} "
            f"| {row['flow_overhead_ms_per_page']:.0f} | {row['flow_non_model_ms_per_page']:.0f} |"
        )
    ratios = [row["ratio"] for row in rows]
    model = [row["model_time_ratio"] for row in rows]
    lines += [
        "",
        f"ratio: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}"
        f"; model time flow / loop: median {statistics.median(model):.2f}",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.argv = argv
    if args.pages < 1 or args.pairs < 1:
        raise SystemExit("--pages and --pairs must be at least 1")
    args.model_cache_dir = args.model_cache_dir or Settings().model_cache_dir
    with work_folder(args.work_dir, "vramflow-paired-") as folder:
        rows = measure(args, Path(folder))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(args, rows))


if __name__ == "__main__":
    main(sys.argv[1:])
