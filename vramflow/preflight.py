"""What `vramflow run` checks before it starts anything: settings, prompt, page range, files.

Plain and fast (no Prefect, no torch): a command line that cannot work is refused in well under
a second, before Prefect's temporary server starts and before the database is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vramflow.config import Settings, resolve_settings
from vramflow.errors import DocumentError
from vramflow.pdf_file import check_file
from vramflow.runs import check_page_range, validate_prompt


def check_run(files: list[Path], pages: str | None, **overrides: Any) -> Settings:
    """The run's settings; raises `ConfigError` for a bad setting, prompt or page range and
    `DocumentError` with a line for every file that is missing, not a file, empty, too large or
    not a PDF (nothing is run then)."""
    settings = resolve_settings(**overrides)
    validate_prompt(settings)
    check_page_range(pages)
    problems = []
    for file in files:
        try:
            check_file(file, settings.max_file_bytes)
        except DocumentError as exc:
            problems.append(str(exc))
    if problems:
        raise DocumentError("\n".join(problems))
    return settings
