"""Pages per second of four ways to run a model over a PDF, on the same pages and model.

    python benchmarks/throughput.py --pages 16 --max-new-tokens 64
    python benchmarks/throughput.py --pages 3 --max-new-tokens 2 --model ./tiny --json
    python benchmarks/throughput.py --page-set mixed --pages 16 --max-new-tokens 32

Variants (each in a fresh interpreter, so peak RSS is its own):
  sequential   pypdf + one `generate` per page in a plain loop, no Prefect; run first and again
               last, and the mean of the two is the baseline (the machine's speed drifts)
  naive_async  `asyncio.gather` over the pages, each extracted and generated in a thread
  flow_batch1  vramflow's `process_pdf` flow with batch size 1
  flow_best    the flow at the fastest of `--batch-sizes`
  flow_tokens  the flow with token-budget batching (VRAMFLOW_MAX_BATCH_TOKENS, set for that
               process only) and requests of the largest of `--batch-sizes` pages, so that the
               engine has the pages of three requests to choose from

Page sets: `default`, dense pages of similar length (a paper, then the demo, then prose);
`mixed`, pages of very different lengths in an order that makes every static batch pad short
pages to long ones (see benchmarks/pages.py; prompts cut at 1,536 tokens unless told).

Model loading, starting the flow's PDF worker processes and a one-page warm-up run are left out
of every timing. Orchestration overhead is wall time minus the time the page work ran (pypdf
extraction, in the process or through the flow's PDF workers, and vramflow's `generate_batch`:
prompt, tokens, generate, decode), per page; non-model time is wall time minus the time the
model's `generate` ran, per page. The slot busy fraction comes from the database (inference time
over first slot acquisition to last release).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from pages import build_mixed_page_set, build_page_set  # noqa: E402
from throughput_report import report, tokens_line  # noqa: E402

# gpu_check.py imports `say` and `work_folder` from here.
from variant_runs import (  # noqa: E402
    add_output_options,
    add_variant_options,
    batch_sizes,
    flow_server,
    mean_of_runs,
    run_variant,
    say,
    to_row,
    work_folder,
)

from vramflow import batching  # noqa: E402
from vramflow.config import DEFAULT_PROMPT, Settings  # noqa: E402

ROW_NAMES = ("sequential", "naive_async", "flow_batch1", "flow_best", "flow_tokens")
PAGE_SETS = {"default": build_page_set, "mixed": build_mixed_page_set}
# Prompt text kept per page when --max-input-tokens is not given: the default set's pages are
# alike and cut short; the mixed set's long pages are the point, so they keep up to 1,536.
MAX_INPUT_TOKENS = {"default": 384, "mixed": 1536}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=16, help="pages to run (default 16)")
    parser.add_argument(
        "--batch-sizes", default="4,8", help="flow_best candidates, comma-separated (default 4,8)"
    )
    parser.add_argument(
        "--flow-torch-threads",
        type=int,
        default=None,
        help="VRAMFLOW_TORCH_THREADS for the flow variants only (default: unset)",
    )
    parser.add_argument(
        "--page-set",
        choices=tuple(PAGE_SETS),
        default="default",
        help="default: pages of similar length; mixed: very different lengths, with\n"
        "--max-input-tokens 1536 unless told (default: default)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="flow_tokens' VRAMFLOW_MAX_BATCH_TOKENS (default: what flow_best's batch holds\n"
        "at the set's median page: its size x (median prompt + new tokens))",
    )
    add_variant_options(parser)
    add_output_options(parser)
    parser.set_defaults(max_input_tokens=None)  # by page set, in main
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every variant's row, and what describes the run (device, database, candidates)."""
    args.pdf, pages_from = PAGE_SETS[args.page_set](work, args.pages)
    first = run_variant("sequential", work, "sequential", args, [])
    naive = run_variant("naive_async", work, "naive_async", args, [])
    with flow_server(work, args.prefect_api_url) as server:
        batch1 = run_variant("flow", work, "flow_batch1", args, [*server, "--batch-size", "1"])
        candidates = [
            run_variant(
                "flow", work, f"flow_batch{size}", args, [*server, "--batch-size", str(size)]
            )
            for size in batch_sizes(args.batch_sizes)
        ]
        best = max(candidates, key=lambda figures: figures["pages"] / figures["wall_seconds"])
        budget = args.max_batch_tokens or default_budget(args, best["batch_size"])
        tokens = run_flow_tokens(args, work, server, budget)
    again = run_variant("sequential", work, "sequential_again", args, [])
    sequential = mean_of_runs(first, again)
    base = sequential["pages"] / sequential["wall_seconds"]
    rows = [
        to_row(name, figures, None if name == "sequential" else base)
        for name, figures in zip(ROW_NAMES, [sequential, naive, batch1, best, tokens], strict=True)
    ]
    context = {
        "device": sequential["device"]
        + ("" if batch1["device"] == sequential["device"] else f"; flow: {batch1['device']}"),
        "database": f"SQLite, a fresh file per flow process ({batch1['database']})",
        "prefect": args.prefect_api_url or "a temporary local server started for the run (SQLite)",
        "pages_from": pages_from,
        "token_budget": (budget, "given" if args.max_batch_tokens else "flow_best's at the median"),
        "model_calls": {"flow_best": best["model_calls"], "flow_tokens": tokens["model_calls"]},
        "sequential_runs": [f["pages"] / f["wall_seconds"] for f in (first, again)],
        "candidates": [
            (c["batch_size"], c["pages"] / c["wall_seconds"], c["slot_busy_fraction"])
            for c in candidates
        ],
        "fixed": [
            (
                name,
                c.get("before_first_hold_seconds"),
                c.get("work_before_first_hold_seconds"),
                c.get("after_last_hold_seconds"),
                phase_overhead_ms_per_page(c),
            )
            for name, c in flow_runs(batch1, candidates, tokens)
        ],
        "runs": {
            name: (figures["max_threads"], figures["cpu_pressure"])
            for name, figures in [("sequential", sequential), ("naive_async", naive)]
            + flow_runs(batch1, candidates, tokens)
        },
    }
    return rows, context


def run_flow_tokens(args: argparse.Namespace, work: Path, server: list[str], budget: int):
    """The flow under token budget `budget`, with requests of the largest candidate's pages (so
    that the engine has the pages of three requests to choose from)."""
    size = str(max(batch_sizes(args.batch_sizes)))
    options = [*server, "--batch-size", size, "--max-batch-tokens", str(budget)]
    return run_variant("flow", work, "flow_tokens", args, options)


def flow_runs(
    batch1: dict[str, Any], candidates: list[dict[str, Any]], tokens: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """Every flow run of the benchmark, by name."""
    return [
        *((f"flow_batch{c['batch_size']}", c) for c in [batch1, *candidates]),
        ("flow_tokens", tokens),
    ]


def phase_overhead_ms_per_page(figures: dict[str, Any]) -> float | None:
    """Orchestration per page while pages run: the time from the first slot hold to the last
    release, minus the page work within it, is what batches cost between them."""
    before, after = figures.get("before_first_hold_seconds"), figures.get("after_last_hold_seconds")
    if before is None or after is None or figures.get("phase_work_seconds") is None:
        return None
    phase = figures["wall_seconds"] - before - after
    return 1000 * (phase - figures["phase_work_seconds"]) / figures["pages"]


def page_tokens(args: argparse.Namespace) -> list[int]:
    """Each page's prompt length in tokens, counted by the model's tokenizer as the engine
    counts them (vramflow.models.prompt_tokens)."""
    from pypdf import PdfReader

    from vramflow import models

    loaded = models.load_model(args.model, args.model_cache_dir)
    texts = [page.extract_text() or "" for page in PdfReader(args.pdf).pages]
    return [
        models.prompt_tokens(loaded, text, DEFAULT_PROMPT, args.max_input_tokens) for text in texts
    ]


def default_budget(args: argparse.Namespace, batch_size: int) -> int:
    """flow_tokens' budget when none is given: what a call of the best static batch size holds
    at the set's median page, so that calls cost about what flow_best's would on pages alike,
    and short pages go many to a call while long ones go few."""
    lengths = sorted(page_tokens(args))
    return batching.padded_cost([lengths[len(lengths) // 2]] * batch_size, args.max_new_tokens)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.argv = argv
    if args.pages < 1:
        raise SystemExit("--pages must be at least 1")
    args.model_cache_dir = args.model_cache_dir or Settings().model_cache_dir
    args.max_input_tokens = args.max_input_tokens or MAX_INPUT_TOKENS[args.page_set]
    with work_folder(args.work_dir, "vramflow-bench-") as folder:
        rows, context = measure(args, Path(folder))
    if args.json:
        say(f"device: {context['device']}; database: {context['database']}")
        say(tokens_line(context))
        print(json.dumps(rows, indent=2))
    else:
        print(report(args, rows, context))


if __name__ == "__main__":
    main(sys.argv[1:])
