"""Checks that need a CUDA card, in one prepared run sized for 8 minutes; prints one table.

    python benchmarks/gpu_check.py [--model SPEC] [--json FILE] [--budget-seconds 420]
    python benchmarks/gpu_check.py --smoke --model ./tiny-model   # a CPU rehearsal

Sections, in this order (each in child processes of this script, sharing one Prefect server):
  throughput   the throughput pages (16), then 128 pages, at 64 new tokens: the flow at static
               batch 1, 8, 16 and 32, with a token budget and with continuous batching; the plain
               batched loop with the batching of the fastest static flow and the continuous one
               (gpu_sections_throughput.py)
  sharing      two models of different sizes sharing the card under memory admission
               (gpu_sections_sharing.py)
  oom          a real CUDA out-of-memory error inside the flow, made with a ballast tensor
               (gpu_sections_oom.py)
  workers      three `vramflow gpu-worker` processes on the card (gpu_sections_workers.py)
  slot         three processes needing 0.6 of the card each, with and without the GPU slot
               (gpu_sections_slot.py)

A section that would run past --budget-seconds is skipped and says so; so are those that need
CUDA in a --smoke run (a few pages, 2 new tokens, on the CPU: it rehearses the script, its
figures mean nothing). Exit status 1 when a check failed or a section broke off (with --smoke:
when a section broke off).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import gpu_sections_oom as oom  # noqa: E402
import gpu_sections_sharing as sharing  # noqa: E402
import gpu_sections_slot as slot  # noqa: E402
import gpu_sections_throughput as throughput  # noqa: E402
import gpu_sections_workers as workers  # noqa: E402
import gpu_throughput_runs  # noqa: E402
from gpu_report import Check, crashed, failed, skipped, table  # noqa: E402
from gpu_support import Context, say  # noqa: E402
from server import temporary_prefect_server  # noqa: E402
from throughput import work_folder  # noqa: E402

from vramflow.config import DEFAULT_MODEL, Settings  # noqa: E402

# What each child role runs (`gpu_check.py --child ROLE SPEC.json`).
CHILD_ROLES: dict[str, Callable[[dict[str, Any]], None]] = {
    "throughput": gpu_throughput_runs.child,
    "oom": oom.child,
    "ballast": slot.child,
    "share": sharing.child,
    "hold": sharing.hold,
    "drive": workers.drive,
}
SECTION_KEYS = ("throughput", "sharing", "oom", "workers", "slot")


@dataclass
class Section:
    key: str  # what --sections names
    title: str
    needs_cuda: bool
    estimate: Callable[[Context], float]  # seconds it takes, start-up included
    run: Callable[[Context], tuple[list[Check], dict[str, Any]]]


def sections(ctx: Context) -> list[Section]:
    """Every section in the order it runs: the acceptance figures first."""

    def page_set(pages: int) -> Section:
        return Section(
            "throughput",
            f"throughput {pages} pages",
            False,
            lambda c: throughput.estimate_seconds(c, pages),
            lambda c: throughput.run(c, pages),
        )

    return [
        *(page_set(pages) for pages in throughput.page_counts(ctx)),
        Section("sharing", sharing.SECTION, False, lambda c: sharing.ESTIMATE_SECONDS, sharing.run),
        Section("oom", oom.SECTION, True, lambda c: oom.ESTIMATE_SECONDS, oom.run),
        Section("workers", workers.SECTION, False, lambda c: workers.ESTIMATE_SECONDS, workers.run),
        Section("slot", slot.SECTION, True, lambda c: slot.ESTIMATE_SECONDS, slot.run),
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    parser.add_argument("--model-cache-dir", type=Path, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (smoke 2)")
    parser.add_argument("--max-input-tokens", type=int, default=384, help="default 384")
    parser.add_argument("--device", default=None, help="cuda:N (default cuda:0; cpu with --smoke)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTION_KEYS),
        help=f"comma-separated, of {', '.join(SECTION_KEYS)} (default: all)",
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="skip sections that would end past this (default 420; 1800 with --smoke)",
    )
    parser.add_argument("--smoke", action="store_true", help="a CPU rehearsal: 2 new tokens")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep inputs and logs here")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("ROLE", "SPEC"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def context(args: argparse.Namespace, work: Path, started: float) -> Context:
    budget = args.budget_seconds or (1800 if args.smoke else 420)
    return Context(
        model=args.model,
        model_cache_dir=args.model_cache_dir or Settings().model_cache_dir,
        device=args.device or ("cpu" if args.smoke else "cuda:0"),
        smoke=args.smoke,
        max_new_tokens=args.max_new_tokens or (2 if args.smoke else 64),
        max_input_tokens=args.max_input_tokens,
        work=work,
        deadline=started + budget,
    )


def run_sections(ctx: Context, chosen: set[str]) -> tuple[list[Check], dict[str, Any]]:
    """Each chosen section in turn, skipped when it needs CUDA that is not there or would not
    end within the budget; one that breaks off gives a failed row and the next one runs."""
    rows: list[Check] = []
    details: dict[str, Any] = {}
    for section in sections(ctx):
        if section.key not in chosen:
            continue
        need, left = section.estimate(ctx), ctx.seconds_left()
        if section.needs_cuda and not ctx.cuda:
            rows.append(skipped(section.title, "no CUDA device"))
            continue
        if need > left:
            rows.append(skipped(section.title, f"needs about {need:.0f} s, {left:.0f} s left"))
            continue
        say(f"{section.title} ...")
        started = time.monotonic()
        try:
            found, detail = section.run(ctx)
        except Exception as exc:
            found, detail = [crashed(section.title, exc)], {"error": traceback.format_exc()}
        rows += found
        details[section.title] = {**detail, "seconds": time.monotonic() - started}
    return rows, details


def header(args: argparse.Namespace, ctx: Context, seconds: float) -> list[str]:
    import prefect
    import torch
    import transformers

    device = ctx.facts.get("device_name") or ctx.device
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    lines = [
        f"command:  {shlex.join(['python', 'benchmarks/gpu_check.py', *args.argv])}",
        f"device:   {device}",
        f"versions: {versions}, Prefect {prefect.__version__}",
        "database: SQLite, a fresh file per run; Prefect: a temporary server for the whole check",
        f"model:    {ctx.model}; {ctx.max_new_tokens} new tokens, prompts cut to "
        f"{ctx.max_input_tokens} page tokens; took {seconds:.0f} s",
    ]
    if ctx.smoke:
        lines.append("smoke:    a CPU rehearsal of the script: its figures mean nothing")
    return lines


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.argv = argv
    if args.child:
        role, spec = args.child
        CHILD_ROLES[role](json.loads(Path(spec).read_text()))
        return
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (--smoke: a rehearsal on the CPU)")
    chosen = {key.strip() for key in args.sections.split(",") if key.strip()}
    started = time.monotonic()
    with work_folder(args.work_dir, "vramflow-gpu-check-") as folder:
        ctx = context(args, Path(folder), started)
        with temporary_prefect_server(ctx.work / "prefect-server") as api_url:
            ctx.api_url = api_url
            rows, details = run_sections(ctx, chosen)
    seconds = time.monotonic() - started
    print("\n".join([*header(args, ctx, seconds), "", table(rows)]))
    if args.json:
        result = {"checks": [row.as_dict() for row in rows], "sections": details}
        args.json.write_text(json.dumps({**result, "seconds": seconds}, indent=2, default=str))
    # A rehearsal fails only when a section broke off: its figures are a CPU's.
    broken = [row for row in failed(rows) if not args.smoke or row.note]
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
