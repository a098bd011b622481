"""Does a 1,000-page PDF go through the flow in bounded memory? Peak RSS against 100 pages.

    python benchmarks/scale.py
    python benchmarks/scale.py --sizes 100,1000 --batch-size 4 --max-new-tokens 4 --json

Generates documents of varied prose (vramflow.demo.pdfgen), then runs vramflow's `process_pdf`
flow over each in a fresh interpreter with a tiny random-weight model (built here unless
`--model` names one), on one temporary Prefect server and a fresh SQLite database per run.
Reports wall time, pages/s, orchestration overhead per page, peak RSS, the most threads seen
and the ratio of the largest document's peak RSS to the smallest's (target: at most 1.25).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from pages import write_prose_pdf  # noqa: E402
from server import temporary_prefect_server  # noqa: E402
from variant_runs import add_output_options, run_variant, say, work_folder  # noqa: E402

TARGET_RATIO = 1.25


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", default="100,1000", help="page counts (default 100,1000)")
    parser.add_argument("--model", default=None, help="default: a tiny model built here")
    parser.add_argument("--batch-size", type=int, default=4, help="default 4 (vramflow's)")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="default 4")
    parser.add_argument("--max-input-tokens", type=int, default=1536, help="default 1536")
    parser.add_argument("--torch-threads", type=int, default=None)
    add_output_options(parser)
    return parser.parse_args(argv)


def tiny_model(folder: Path) -> str:
    try:
        from tests.fixtures.models import build_tiny_model
    except ImportError as exc:  # the tests folder (and pytest) are not installed
        raise SystemExit(f"cannot build the tiny model ({exc}): pass --model") from None
    return str(build_tiny_model(folder / "tiny-model"))


def to_row(figures: dict[str, Any]) -> dict[str, Any]:
    pages, wall = figures["pages"], figures["wall_seconds"]
    return {
        "pages": pages,
        "wall_seconds": wall,
        "pages_per_s": pages / wall,
        "overhead_ms_per_page": 1000 * (wall - figures["work_seconds"]) / pages,
        "peak_rss_bytes": figures["peak_rss_bytes"],
        "max_threads": figures["max_threads"],
        "slot_holds": figures["slot_holds"],
        "rss_mib_profile": figures["rss_mib_profile"],
    }


def measure(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    sizes = sorted({int(part) for part in args.sizes.split(",") if part.strip()})
    args.model = args.model or tiny_model(work)
    args.model_cache_dir = work / "models"
    rows = []
    say("starting a temporary Prefect server ...")
    with temporary_prefect_server(work / "prefect-server") as api_url:
        for size in sizes:
            args.pdf = write_prose_pdf(work / f"prose-{size}.pdf", size, seed=size)
            extra = ["--prefect-api-url", api_url, "--batch-size", str(args.batch_size)]
            rows.append(to_row(run_variant("flow", work, f"flow-{size}-pages", args, extra)))
    return rows


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"model: {args.model}; batch size {args.batch_size}; {args.max_new_tokens} new tokens",
        "",
        "| pages | wall s | pages/s | orchestration ms/page | peak RSS MiB | most threads "
        "| holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['pages']} | {row['wall_seconds']:.1f} | {row['pages_per_s']:.2f} | "
            f"{row['overhead_ms_per_page']:.0f} | {row['peak_rss_bytes'] / 2**20:.0f} | "
            f"{row['max_threads']} | {row['slot_holds']} |"
        )
    lines.append("")
    for row in rows:
        lines.append(f"RSS during the {row['pages']}-page run (MiB): {row['rss_mib_profile']}")
    ratio = rows[-1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    lines.append(
        f"peak RSS {rows[-1]['pages']} / {rows[0]['pages']} pages: {ratio:.3f} "
        f"(target <= {TARGET_RATIO}: {verdict})"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with work_folder(args.work_dir, "vramflow-scale-") as folder:
        rows = measure(args, Path(folder))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(report(args, rows))


if __name__ == "__main__":
    main(sys.argv[1:])
