"""Running benchmark variants: each in a fresh interpreter (variants.py), its figures made into
a row. Shared by throughput.py, paired.py, sweep.py and scale.py, so their rows compare."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server import temporary_prefect_server

from vramflow.config import DEFAULT_MODEL

HERE = Path(__file__).resolve().parent
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


@contextmanager
def flow_server(work: Path, given_url: str | None) -> Iterator[list[str]]:
    if given_url:
        yield ["--prefect-api-url", given_url]
        return
    say("starting a temporary Prefect server for the flow variants ...")
    with temporary_prefect_server(work / "prefect-server") as api_url:
        yield ["--prefect-api-url", api_url]


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
