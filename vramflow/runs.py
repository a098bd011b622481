"""What identifies a run's results: the idempotence key parts derived from the settings."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from vramflow.config import Settings
from vramflow.errors import ConfigError


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_identity(spec: str) -> str:
    """A stable id for the idempotence key: folders by absolute path, others as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def generation_settings_json(settings: Settings) -> str:
    """The settings that change an answer (not batch size or device); greedy decoding."""
    return json.dumps(
        {
            "max_new_tokens": settings.max_new_tokens,
            "max_input_tokens": settings.max_input_tokens,
            "do_sample": False,
        },
        sort_keys=True,
    )


def key_parts(settings: Settings) -> tuple[str, str, str]:
    """(model id, prompt hash, settings hash) for the result idempotence key."""
    return (
        model_identity(settings.model),
        _sha(settings.prompt),
        _sha(generation_settings_json(settings)),
    )


def validate_prompt(settings: Settings) -> None:
    if not settings.prompt.strip():
        raise ConfigError("the prompt is empty")
    if len(settings.prompt) > settings.max_prompt_chars:
        raise ConfigError(
            f"the prompt has {len(settings.prompt)} characters; the limit is "
            f"{settings.max_prompt_chars} (VRAMFLOW_MAX_PROMPT_CHARS)"
        )


def check_page_range(spec: str | None) -> None:
    """Raise `ConfigError` unless `spec` is a valid page range; needs no document."""
    _range_parts(spec)


def parse_page_range(spec: str | None, page_count: int) -> list[int]:
    """'1-3,7' → [1, 2, 3, 7], clipped to the document; None or '' → every page."""
    if not spec:
        return list(range(1, page_count + 1))
    pages: set[int] = set()
    for first, last in _range_parts(spec):
        pages.update(range(first, min(page_count if last is None else last, page_count) + 1))
    return sorted(pages)


def _range_parts(spec: str | None) -> list[tuple[int, int | None]]:
    """'1-3,7,9-' → [(1, 3), (7, 7), (9, None)]; None: open end."""
    if not spec:
        return []
    parts: list[tuple[int, int | None]] = []
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d*))?", part)
        if not match:
            raise ConfigError(f"bad page range {spec!r}: use e.g. '1-5,8' or '10-'")
        first = int(match.group(1))
        tail = match.group(2)
        last = first if tail is None else (int(tail) if tail else None)
        if first < 1 or (last is not None and last < first):
            raise ConfigError(f"bad page range {part!r} in {spec!r}: pages count up from 1")
        parts.append((first, last))
    return parts
