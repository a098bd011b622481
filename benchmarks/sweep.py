"""Many small documents: the sweep-inbox flow one document at a time, and side by side.

    python benchmarks/sweep.py --documents 4 --pages-per-document 4 --max-new-tokens 64
    python benchmarks/sweep.py --documents 3 --pages-per-document 2 --max-new-tokens 2 \\
        --model ./tiny --json

Splits the benchmark pages (the same as throughput.py's) into documents of equal length and
runs, each in a fresh interpreter on the same model and pages:
  sequential   pypdf + one `generate` per page over every document in a plain loop, no Prefect;
               run first and again last, and the mean of the two is the baseline
  sweep_atN    vramflow's `sweep_inbox` flow with `documents_at_once` N, for each of `--at-once`

Every document has a fixed cost outside the GPU slot (its flow run, opening, Prefect's teardown);
one document at a time the model waits through all of it, side by side another document's
batches fill it. Orchestration ms/page is wall time minus page work, per page, as in
throughput.py; slot busy is inference time over the time from the first slot hold to the last
release of the whole sweep.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from pypdf import PdfWriter

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from pages import build_page_set  # noqa: E402
from throughput_report import fmt  # noqa: E402
from variant_runs import (  # noqa: E402
    add_output_options,
    add_variant_options,
    batch_sizes,
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
    parser.add_argument("--documents", type=int, default=4, help="default 4")
    parser.add_argument("--pages-per-document", type=int, default=4, help="default 4")
    parser.add_argument(
        "--at-once", default="1,2", help="documents_at_once values to run (default 1,2)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="default 4 (vramflow's)")
    add_variant_options(parser)
    add_output_options(parser)
    return parser.parse_args(argv)


def split_documents(source: Path, folder: Path, documents: int, per_document: int) -> Path:
    """`documents` PDFs of `per_document` consecutive pages of `source`, in a new folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        writer = PdfWriter()
        first = index * per_document
        writer.append(str(source), pages=(first, first + per_document))
        with open(folder / f"doc-{index + 1:02d}.pdf", "wb") as handle:
            writer.write(handle)
    return folder


def sweep_row(name: str, figures: dict[str, Any], baseline: float | None) -> dict[str, Any]:
    """throughput.py's row, with the documents and how many ran at once."""
    row = to_row(name, figures, baseline)
    return {
        **row,
        "documents": figures["documents"],
        "documents_at_once": figures["documents_at_once"],
    }


def measure(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    pages = args.documents * args.pages_per_document
    source, _ = build_page_set(work, pages)
    args.pdf = split_documents(source, work / "inbox", args.documents, args.pages_per_document)
    first = run_variant("sequential", work, "sequential", args, [])
    sweeps = []
    with flow_server(work, args.prefect_api_url) as server:
        for at_once in batch_sizes(args.at_once):
            options = [*server, "--batch-size", str(args.batch_size)]
            options += ["--documents-at-once", str(at_once)]
            sweeps.append(run_variant("sweep", work, f"sweep_at{at_once}", args, options))
    # As in throughput.py: the plain loop before and after, against the machine's drift.
    sequential = mean_of_runs(first, run_variant("sequential", work, "sequential_again", args, []))
    base = sequential["pages"] / sequential["wall_seconds"]
    rows = [sweep_row("sequential", sequential, None)]
    rows += [sweep_row(f"sweep_at{f['documents_at_once']}", f, base) for f in sweeps]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = ["variant", "documents at once", "batch", "pages/s", "× sequential"]
    header += ["orchestration ms/page", "peak RSS MiB", "max concurrent calls", "slot busy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["name"],
            str(row["documents_at_once"]),
            str(row["batch_size"]),
            fmt(row["pages_per_s"], ".3f"),
            fmt(row["ratio_to_sequential"], ".2f"),
            fmt(row["overhead_ms_per_page"], ".0f"),
            fmt(row["peak_rss_bytes"] / 2**20, ".0f"),
            str(row["max_concurrent_calls"]),
            fmt(row["slot_busy_fraction"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.documents < 1 or args.pages_per_document < 1:
        raise SystemExit("--documents and --pages-per-document must be at least 1")
    args.model_cache_dir = args.model_cache_dir or Settings().model_cache_dir
    with work_folder(args.work_dir, "vramflow-sweep-") as folder:
        rows = measure(args, Path(folder))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"command:  {shlex.join(['python', 'benchmarks/sweep.py', *argv])}")
    print(f"prefect:  {args.prefect_api_url or 'a temporary local server (SQLite)'}")
    pages = f"{args.pages_per_document} pages each"
    print(f"documents: {args.documents} of {pages}, {args.max_new_tokens} new tokens, greedy")
    print(f"model:    {args.model}\n")
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
