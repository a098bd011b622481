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


def test_prompt_lengths_counts_each_page_once_with_the_counter_and_forgets_taken_pages():
    from types import SimpleNamespace

    from vramflow.batching import PromptLengths, estimate_tokens

    group = SimpleNamespace(prompt="Summarise.", max_input_tokens=1536)
    form = SimpleNamespace(ident=1, text="1a 2b 3c 4d " * 50)  # about 2-3 bytes a token
    counted: list[str] = []

    def count(loaded, text, prompt, max_input_tokens):
        counted.append(text)
        return 999

    lengths = PromptLengths()
    assert lengths.of(None, group, form, count) == lengths.of(None, group, form, count) == 999
    assert len(counted) == 1
    lengths.forget(group, form)
    assert lengths.of(None, group, form) == estimate_tokens(form.text, group.prompt, 1536) != 999


def test_the_engine_counts_prompts_with_the_tokenizer_where_an_estimate_falls_short(
    tiny_model_dir,
):
    """Form-like text runs at under 4 bytes a token: the tokenizer's count is the real one."""
    from vramflow import models
    from vramflow.batching import estimate_tokens

    loaded = models.load_model(str(tiny_model_dir), tiny_model_dir.parent)
    text = "Line 7a. 1,234.56 | 12 | 0.00 | X " * 40
    counted = models.prompt_tokens(loaded, text, "Summarise.", 1536)
    [built], _ = models.build_prompts(loaded, "Summarise.", [text], 1536)
    assert counted == len(loaded.tokenizer(built, add_special_tokens=False)["input_ids"])
    assert counted > estimate_tokens(text, "Summarise.", 1536)
