"""What padding costs a model call, apart from Prefect: the same pages grouped four ways.

    python benchmarks/padding.py --pages 16 --max-new-tokens 16 --batch-size 8

The mixed page set (benchmarks/pages.py) through `vramflow.models.generate_batch` in one
process, no flow: static batches of `--batch-size` in page order (what flow_best does), the
engine's token-budget groups (vramflow.batching.by_tokens, its budget as throughput.py's
flow_tokens), and pages sorted by length in batches of `--batch-size` (least padding for the
same number of calls). Each grouping runs twice, in the order A B B A, and the table shows the
mean. Padded tokens count every row of a call at its longest prompt, by the real tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from pages import build_mixed_page_set  # noqa: E402

from vramflow import batching, models  # noqa: E402
from vramflow.config import DEFAULT_MODEL, DEFAULT_PROMPT, Settings  # noqa: E402


def page_texts(pdf: Path) -> list[str]:
    from pypdf import PdfReader

    return [page.extract_text() or "" for page in PdfReader(pdf).pages]


def prompt_lengths(loaded: models.LoadedModel, texts: list[str], max_input: int) -> list[int]:
    """Each page's prompt in tokens, as the engine counts it."""
    return [models.prompt_tokens(loaded, text, DEFAULT_PROMPT, max_input) for text in texts]


def token_groups(lengths: list[int], args: argparse.Namespace) -> list[list[int]]:
    """The engine's calls over these pages, all waiting at once, under flow_tokens' budget."""
    median = sorted(lengths)[len(lengths) // 2]
    budget = batching.padded_cost([median] * args.batch_size, args.max_new_tokens)
    waiting, groups = list(range(len(lengths))), []
    while waiting:
        picked = batching.by_tokens([lengths[i] for i in waiting], budget, args.max_new_tokens)
        groups.append([waiting[i] for i in picked])
        waiting = [page for i, page in enumerate(waiting) if i not in set(picked)]
    return groups


def groupings(texts: list[str], lengths: list[int], args) -> dict[str, list[list[int]]]:
    size, order = args.batch_size, list(range(len(texts)))
    by_length = sorted(order, key=lambda i: lengths[i])
    return {
        f"static {size}, page order": [order[i : i + size] for i in range(0, len(order), size)],
        "token budget (engine)": token_groups(lengths, args),
        f"static {size}, sorted by length": [
            by_length[i : i + size] for i in range(0, len(by_length), size)
        ],
    }


def timed(loaded, texts: list[str], groups: list[list[int]], args) -> float:
    started = time.perf_counter()
    for group in groups:
        models.generate_batch(
            loaded,
            DEFAULT_PROMPT,
            [texts[i] for i in group],
            device="cpu",
            max_new_tokens=args.max_new_tokens,
            max_input_tokens=args.max_input_tokens,
            timeout_s=3600,
        )
    return time.perf_counter() - started


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-input-tokens", type=int, default=1536)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    settings = Settings()
    loaded = models.load_model(args.model, settings.model_cache_dir)
    with tempfile.TemporaryDirectory() as folder:
        pdf, described = build_mixed_page_set(Path(folder), args.pages)
        texts = page_texts(pdf)
    lengths = prompt_lengths(loaded, texts, args.max_input_tokens)
    ways = groupings(texts, lengths, args)
    timed(loaded, texts[:2], [[0, 1]], args)  # warm-up
    seconds = {name: [] for name in ways}
    for name in [*ways, *reversed(ways)]:
        seconds[name].append(timed(loaded, texts, ways[name], args))
    print(f"{described}; {args.max_new_tokens} new tokens; prompt tokens {sum(lengths)}")
    first = None
    print(f"| grouping | calls | padded prompt tokens | seconds | pages/s | × {next(iter(ways))} |")
    print("|---|---|---|---|---|---|")
    for name, groups in ways.items():
        padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
        mean = sum(seconds[name]) / len(seconds[name])
        first = first or mean
        print(
            f"| {name} | {len(groups)} | {padded} | {mean:.1f} | {len(texts) / mean:.3f} "
            f"| {first / mean:.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
