"""Choosing a call's pages by a token budget: similar lengths together, padded cost bounded."""

from __future__ import annotations

from vramflow.batching import by_count, by_tokens, estimate_tokens, padded_cost


def test_by_count_takes_the_oldest_pages():
    assert by_count(10, 4) == [0, 1, 2, 3]
    assert by_count(2, 4) == [0, 1]


def test_by_tokens_puts_short_pages_with_short_ones_within_the_budget():
    lengths = [100, 1500, 120, 1400, 90, 110]
    picked = by_tokens(lengths, budget=4 * (120 + 16), max_new_tokens=16)
    assert picked == [0, 2, 4, 5]  # the four short ones; neither long page is padded into them
    assert padded_cost([lengths[i] for i in picked], 16) <= 4 * (120 + 16)


def test_by_tokens_starts_with_the_oldest_page_even_a_long_one():
    lengths = [1500, 100, 1400, 120]
    assert by_tokens(lengths, budget=2 * (1500 + 16), max_new_tokens=16) == [0, 2]
    assert by_tokens(lengths, budget=100, max_new_tokens=16) == [0]  # alone when nothing fits


def test_a_budget_fills_calls_of_many_short_pages_or_few_long_ones():
    short = by_tokens([100] * 50, budget=2048, max_new_tokens=28)
    long = by_tokens([1000] * 50, budget=2048, max_new_tokens=24)
    assert (len(short), len(long)) == (16, 2)


def test_estimates_follow_text_length_and_truncation():
    prompt = "Summarise this page."
    short, long = (estimate_tokens("word " * n, prompt, 1536) for n in (10, 10_000))
    assert short < 100 < 1536 < long <= 1536 + 64
