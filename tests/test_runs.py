"""Idempotence-key parts, prompt limits and page ranges."""

from __future__ import annotations

import pytest

from vramflow.config import Settings
from vramflow.errors import ConfigError
from vramflow.runs import check_page_range, key_parts, parse_page_range, validate_prompt


def test_page_ranges():
    assert parse_page_range(None, 3) == [1, 2, 3]
    assert parse_page_range("2-3,1, 9", 5) == [1, 2, 3]
    assert parse_page_range("4-", 6) == [4, 5, 6]
    for bad in ("0", "3-1", "a", "1--2"):
        with pytest.raises(ConfigError):
            parse_page_range(bad, 5)


def test_key_changes_with_prompt_and_generation_settings_but_not_batch_size():
    base = key_parts(Settings(prompt="a"))
    assert key_parts(Settings(prompt="a", batch_size=9)) == base
    assert key_parts(Settings(prompt="b")) != base
    assert key_parts(Settings(prompt="a", max_new_tokens=7)) != base


def test_prompt_limits():
    validate_prompt(Settings(prompt="ok"))
    with pytest.raises(ConfigError, match="empty"):
        validate_prompt(Settings(prompt="  "))
    with pytest.raises(ConfigError, match="VRAMFLOW_MAX_PROMPT_CHARS"):
        validate_prompt(Settings(prompt="x" * 50, max_prompt_chars=10))


def test_a_page_range_is_checked_without_a_document():
    for good in (None, "", "1-5,8", "10-", " 2 , 4-6"):
        check_page_range(good)
    for bad in ("9-3", "0", "3-0", "a", "1--2", "1-5;8"):
        with pytest.raises(ConfigError, match="bad page range"):
            check_page_range(bad)
