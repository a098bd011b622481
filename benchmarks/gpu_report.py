"""gpu_check.py's one table: each check of each section, its figure, its target and result."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Check:
    """One row: `passed` None is a figure shown for information, with no target."""

    section: str
    name: str
    figure: str
    target: str = "-"
    passed: bool | None = None
    note: str = ""  # why a section did not run, or what failed

    @property
    def result(self) -> str:
        if self.note:
            return self.note
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "result": self.result}


def skipped(section: str, why: str) -> Check:
    return Check(section, "-", "-", "-", None, f"skipped: {why}")


def crashed(section: str, error: BaseException) -> Check:
    """A row for a section that broke off; it fails the run."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return Check(section, "section ran to its end", "no", "yes", False, f"FAIL: {first}")


def at_least(section: str, name: str, value: float | None, target: float, fmt: str = ".2f"):
    """A check that `value` reaches `target` (no value: it could not be measured, a failure)."""
    figure = "-" if value is None else format(value, fmt)
    return Check(section, name, figure, f">= {target:{fmt}}", value is not None and value >= target)


def equals(section: str, name: str, value: Any, target: Any) -> Check:
    return Check(section, name, str(value), str(target), value == target)


def info(section: str, name: str, figure: str) -> Check:
    return Check(section, name, figure)


def failed(checks: list[Check]) -> list[Check]:
    """Rows that fail the run: a check missed, or a section that broke off."""
    return [c for c in checks if c.passed is False]


def table(checks: list[Check]) -> str:
    """The checks as one Markdown table."""
    header = ["section", "check", "figure", "target", "result"]
    rows = [[c.section, c.name, c.figure, c.target, c.result] for c in checks]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
