"""How the engine chooses the pages of its next model call: by count, or by a token budget.

By count: the oldest waiting pages, up to the batch size. By tokens: the oldest waiting page and
the waiting pages closest to it in length, as many as fit a budget of padded tokens (every page
of a call is padded to its longest prompt, and each generates `max_new_tokens`), so that short
pages share a call with short pages and long ones with long ones, and a call is sized by what
it costs rather than by how many pages it carries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# Bytes of page text per token, to estimate a prompt's length without the tokenizer (English
# prose with a BPE tokenizer runs at about four; an underestimate only makes calls a little
# larger than the budget).
BYTES_PER_TOKEN = 4
# Tokens of the chat template and the instruction's framing, beyond the prompt's own.
TEMPLATE_TOKENS = 32
# The most pages one call carries under a token budget, however short they are.
MAX_PAGES_PER_CALL = 256


def estimate_tokens(text: str, prompt: str, max_input_tokens: int) -> int:
    """A page's prompt length in tokens, as generation will see it (after truncation)."""
    page = min(max_input_tokens, -(-len(text.encode()) // BYTES_PER_TOKEN))
    return page + -(-len(prompt.encode()) // BYTES_PER_TOKEN) + TEMPLATE_TOKENS


class PromptLengths:
    """Prompt lengths of waiting pages, counted once per page and call group: by the model's
    tokenizer where there is one (form pages run at under 3 bytes a token, so an estimate from
    bytes lets their calls run past the budget), else estimated (`estimate_tokens`)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[Any, ...], int] = {}

    def of(
        self, loaded: Any, group: Any, page: Any, count: Callable[..., int] | None = None
    ) -> int:
        """`page`'s prompt length in `group` (its prompt and max_input_tokens); `count(loaded,
        text, prompt, max_input_tokens)` counts it, else it is estimated."""
        key = self._key(group, page)
        if key not in self._counts:
            if count is None:
                length = estimate_tokens(page.text, group.prompt, group.max_input_tokens)
            else:
                length = count(loaded, page.text, group.prompt, group.max_input_tokens)
            self._counts[key] = length
        return self._counts[key]

    def forget(self, group: Any, page: Any) -> None:
        """Drop a page's count once it is taken (an engine runs for days)."""
        self._counts.pop(self._key(group, page), None)

    @staticmethod
    def _key(group: Any, page: Any) -> tuple[Any, ...]:
        return (page.ident, group.prompt, group.max_input_tokens)


def padded_cost(lengths: Sequence[int], max_new_tokens: int) -> int:
    """Tokens a call over prompts of `lengths` holds at its end: every row padded to the
    longest prompt, plus the generated tokens."""
    return len(lengths) * (max(lengths) + max_new_tokens) if lengths else 0


def by_count(waiting: int, batch_size: int) -> list[int]:
    """Indices of the oldest `batch_size` of `waiting` pages."""
    return list(range(min(waiting, batch_size)))


def by_tokens(
    lengths: Sequence[int], budget: int, max_new_tokens: int, max_pages: int = MAX_PAGES_PER_CALL
) -> list[int]:
    """Indices (into `lengths`, oldest first) of the next call's pages under `budget`.

    The oldest page always goes (alone, if it does not fit with another); then, nearest in
    length first, every page that keeps the padded cost within the budget, up to `max_pages`.
    """
    if not lengths:
        return []
    anchor = lengths[0]
    nearest = sorted(range(1, len(lengths)), key=lambda i: (abs(lengths[i] - anchor), i))
    chosen, chosen_lengths = [0], [anchor]
    for index in nearest:
        if len(chosen) >= max_pages:
            break
        trial = [*chosen_lengths, lengths[index]]
        if padded_cost(trial, max_new_tokens) <= budget:
            chosen.append(index)
            chosen_lengths = trial
    return sorted(chosen)
