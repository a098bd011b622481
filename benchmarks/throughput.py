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
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from pages import build_mixed_page_set, build_page_set  # noqa: E402
from server import temporary_prefect_server  # noqa: E402

from vramflow import batching  # noqa: E402
from vramflow.config import DEFAULT_MODEL, DEFAULT_PROMPT, Settings  # noqa: E402

# naive_async makes its own pressure (6 threads on the cores); the others should see almost none.
PRESSURE_WARNING = 0.2
ROW_NAMES = ("sequential", "naive_async", "flow_batch1", "flow_best", "flow_tokens")
PAGE_SETS = {"default": build_page_set, "mixed": build_mixed_page_set}
# Prompt text kept per page when --max-input-tokens is not given: the default set's pages are
# alike and cut short; the mixed set's long pages are the point, so they keep up to 1,536.
MAX_INPUT_TOKENS = {"default": 384, "mixed": 1536}
ROW_KEYS = (
    "name",
    "pages_per_s",
    "ratio_to_sequential",
    "overhead_ms_per_page",
    "peak_rss_bytes",
    "peak_vram_bytes",
    "max_concurrent_calls",
    "slot_busy_fraction",
    "batch_size",
    "pages",
    "wall_seconds",
    "model_seconds",
    "non_model_ms_per_page",
    "work_seconds",
)


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


def add_variant_options(parser: argparse.ArgumentParser) -> None:
    """What `run_variant` passes on to every variant: model, tokens, threads, server. Shared
    with sweep.py."""
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    parser.add_argument(
        "--max-input-tokens",
        type=int,
        default=384,
        help="page tokens kept per prompt (default 384: prompts of about 430 tokens)",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    parser.add_argument(
        "--model-cache-dir",
        type=Path,
        default=None,
        help="where the default model is converted once (default: $VRAMFLOW_HOME/models)",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument(
        "--prefect-api-url",
        default=None,
        help="run the flow variants against this Prefect server (for example one on\n"
        "PostgreSQL) instead of a temporary one started for the run",
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """`--work-dir` and `--json`, shared with scale.py."""
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep inputs and logs here (default: a temp dir)",
    )
    parser.add_argument("--json", action="store_true", help="print only the rows, as JSON")


def batch_sizes(text: str) -> list[int]:
    sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"--batch-sizes needs positive integers, got {text!r}")
    return sizes


def run_variant(
    variant: str,
    work: Path,
    label: str,
    args: argparse.Namespace,
    extra: list[str],
    environ: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; its log goes to a file, its figures come back.
    `environ` is added to that interpreter's environment only (settings of one variant)."""
    home, out = work / label, work / f"{label}.json"
    command = [
        sys.executable,
        str(HERE / "variants.py"),
        variant,
        "--pdf",
        str(args.pdf),
        "--home",
        str(home),
        "--out",
        str(out),
        "--model",
        args.model,
        "--model-cache-dir",
        str(args.model_cache_dir),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--max-input-tokens",
        str(args.max_input_tokens),
        *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else []),
        *extra,
    ]
    env = {**os.environ, **(environ or {})}
    if variant == "flow" and getattr(args, "flow_torch_threads", None):
        env["VRAMFLOW_TORCH_THREADS"] = str(args.flow_torch_threads)
    say(f"running {label} ...")
    with open(work / f"{label}.log", "wb") as log:
        code = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
        ).returncode
    if code != 0:
        tail = (work / f"{label}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{label} failed (exit {code}):\n{tail}")
    return json.loads(out.read_text())


def to_row(name: str, figures: dict[str, Any], baseline: float | None) -> dict[str, Any]:
    pages, wall = figures["pages"], figures["wall_seconds"]
    rate = pages / wall
    row = {
        "name": name,
        "pages_per_s": rate,
        "ratio_to_sequential": rate / baseline if baseline else 1.0,
        "overhead_ms_per_page": 1000 * (wall - figures["work_seconds"]) / pages,
        "peak_rss_bytes": figures["peak_rss_bytes"],
        "peak_vram_bytes": figures["peak_vram_bytes"],
        "max_concurrent_calls": figures["max_concurrent_calls"],
        "slot_busy_fraction": figures["slot_busy_fraction"],
        "batch_size": figures["batch_size"],
        "pages": pages,
        "wall_seconds": wall,
        "model_seconds": figures["model_seconds"],
        "non_model_ms_per_page": 1000 * (wall - figures["model_seconds"]) / pages,
        "work_seconds": figures["work_seconds"],
    }
    assert tuple(row) == ROW_KEYS
    return row


def mean_of_runs(first: dict[str, Any], again: dict[str, Any]) -> dict[str, Any]:
    """One baseline from the plain loop run before and after the other variants: this machine's
    speed drifts by several percent over the minutes between them, and the mean of the two is
    the fairer measure for variants run in between. Peaks are the higher of the two."""
    mean = {**first}
    for key in ("wall_seconds", "work_seconds", "model_seconds"):
        mean[key] = (first[key] + again[key]) / 2
    for key in ("peak_rss_bytes", "max_concurrent_calls"):
        mean[key] = max(first[key], again[key])
    return mean


def phase_overhead_ms_per_page(figures: dict[str, Any]) -> float | None:
    """Orchestration per page while pages run: the time from the first slot hold to the last
    release, minus the page work within it, is what batches cost between them."""
    before, after = figures.get("before_first_hold_seconds"), figures.get("after_last_hold_seconds")
    if before is None or after is None or figures.get("phase_work_seconds") is None:
        return None
    phase = figures["wall_seconds"] - before - after
    return 1000 * (phase - figures["phase_work_seconds"]) / figures["pages"]


@contextmanager
def flow_server(work: Path, given_url: str | None) -> Iterator[list[str]]:
    if given_url:
        yield ["--prefect-api-url", given_url]
        return
    say("starting a temporary Prefect server for the flow variants ...")
    with temporary_prefect_server(work / "prefect-server") as api_url:
        yield ["--prefect-api-url", api_url]


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
        tokens = run_variant(
            "flow",
            work,
            "flow_tokens",
            args,
            [*server, "--batch-size", str(max(batch_sizes(args.batch_sizes)))],
            {"VRAMFLOW_MAX_BATCH_TOKENS": str(budget)},
        )
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


def flow_runs(
    batch1: dict[str, Any], candidates: list[dict[str, Any]], tokens: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """Every flow run of the benchmark, by name."""
    return [
        *((f"flow_batch{c['batch_size']}", c) for c in [batch1, *candidates]),
        ("flow_tokens", tokens),
    ]


def page_tokens(pdf: Path, max_input_tokens: int) -> list[int]:
    """Each page's prompt length as the engine estimates it (vramflow.batching)."""
    from pypdf import PdfReader

    texts = [page.extract_text() or "" for page in PdfReader(pdf).pages]
    return [batching.estimate_tokens(text, DEFAULT_PROMPT, max_input_tokens) for text in texts]


def default_budget(args: argparse.Namespace, batch_size: int) -> int:
    """flow_tokens' budget when none is given: what a call of the best static batch size holds
    at the set's median page, so that calls cost about what flow_best's would on pages alike,
    and short pages go many to a call while long ones go few."""
    lengths = sorted(page_tokens(args.pdf, args.max_input_tokens))
    return batching.padded_cost([lengths[len(lengths) // 2]] * batch_size, args.max_new_tokens)


def _fmt(value: Any, spec: str) -> str:
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
            _fmt(row["pages_per_s"], ".3f"),
            _fmt(row["ratio_to_sequential"], ".2f"),
            _fmt(row["overhead_ms_per_page"], ".0f"),
            _fmt(row["non_model_ms_per_page"], ".0f"),
            _fmt(row["peak_rss_bytes"] / 2**20, ".0f"),
        ]
        if gpu:
            vram = row["peak_vram_bytes"]
            cells.append(_fmt(vram / 2**20 if vram else None, ".0f"))
        cells += [str(row["max_concurrent_calls"]), _fmt(row["slot_busy_fraction"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args: argparse.Namespace, rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    candidates = ", ".join(
        f"batch {size}: {rate:.3f} pages/s, slot busy {_fmt(busy, '.2f')}"
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
            "flow_tokens: budget {} tokens ({}); model calls: flow_best {}, flow_tokens {}".format(
                *context["token_budget"], *context["model_calls"].values()
            ),
            "fixed cost of the document (s before the first slot hold, of which extracting "
            "the first batch / after the last): "
            + ", ".join(
                f"{name} {_fmt(before, '.2f')}, {_fmt(extracting, '.2f')} / {_fmt(after, '.2f')}"
                for name, before, extracting, after, _ in context["fixed"]
            ),
            "orchestration ms/page from the first slot hold to the last release (the fixed cost "
            "left out): "
            + ", ".join(
                f"{name} {_fmt(in_phase, '.0f')}" for name, *_, in_phase in context["fixed"]
            ),
            "most threads seen, and CPU pressure (share of the run during which some task on",
            "this machine waited for a CPU; other work on the machine raises it):",
            "  "
            + ", ".join(
                f"{name} {threads} threads, {_fmt(pressure, '.0%')}"
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


@contextmanager
def work_folder(keep: Path | None, prefix: str) -> Iterator[str]:
    """`keep` (created, left in place) or a temporary folder removed at the end."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield str(keep.resolve())
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield folder


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
        print(json.dumps(rows, indent=2))
    else:
        print(report(args, rows, context))


if __name__ == "__main__":
    main(sys.argv[1:])
