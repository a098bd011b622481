"""Benchmarks set up their own state, whatever `VRAMFLOW_*` the caller's environment holds.

A caller's `VRAMFLOW_DATABASE_URL` once gave every variant of a benchmark the same database:
the second variant found every page done and measured nothing. Only the hardware choices
below pass through; everything else (database, home, inbox, model, prompt, limits, fault
injection) is the benchmark's own.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path

# Which device and how many CPU threads, and where the sample corpus lies: the machine's
# choices, which a benchmark reports rather than sets.
PASSED_THROUGH = (
    "VRAMFLOW_DEVICE",
    "VRAMFLOW_DTYPE",
    "VRAMFLOW_TORCH_THREADS",
    "VRAMFLOW_CORPUS",
)


def own_state(env: MutableMapping[str, str], home: Path, **settings: str) -> None:
    """Drop the caller's other `VRAMFLOW_*` variables from `env`, then point it at `home`
    (its own SQLite database, converted models and slot records) and set `settings`."""
    for name in [k for k in env if k.startswith("VRAMFLOW_") and k not in PASSED_THROUGH]:
        del env[name]
    env["VRAMFLOW_HOME"] = str(home)
    env.update(settings)
