"""Fault injection: raise a genuine `torch.OutOfMemoryError` inside the model call.

`VRAMFLOW_INJECT_OOM="page=3,times=2"` fails the first two model calls whose batch contains
page 3; `times=all` fails every one. `above=2` fails every call of more than two pages, like a
card with room for two. Used by tests and demos on machines without a GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from vramflow.errors import ConfigError


@dataclass
class OomInjector:
    page: int | None
    times: int | None  # None: every time
    above: int | None = None  # fail every call of more pages than this instead
    fired: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def check(self, pages: list[int]) -> None:
        """Raise an OOM if this batch holds the target page and the budget is not spent."""
        if self.above is not None:
            if len(pages) > self.above:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (injected by VRAMFLOW_INJECT_OOM: {len(pages)} pages "
                    f"in a call, room for {self.above})"
                )
            return
        if self.page not in pages:
            return
        with self._lock:
            if self.times is not None and self.fired >= self.times:
                return
            self.fired += 1
        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected by VRAMFLOW_INJECT_OOM for page {self.page}, "
            f"batch of {len(pages)})"
        )


_injectors: dict[str, OomInjector] = {}
_lock = threading.Lock()


def parse_spec(spec: str) -> OomInjector:
    fields = dict(part.split("=", 1) for part in spec.replace(" ", "").split(",") if "=" in part)
    try:
        if "above" in fields:
            return OomInjector(None, None, above=int(fields["above"]))
        page = int(fields["page"])
        raw = fields.get("times", "1")
        times = None if raw in ("all", "always", "-1") else int(raw)
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            f"bad VRAMFLOW_INJECT_OOM {spec!r}: use 'page=N,times=K|all' or 'above=N'"
        ) from exc
    return OomInjector(page, times)


def injector_for(spec: str | None) -> OomInjector | None:
    """One injector per spec per process, so `times` counts across retries in this process."""
    if not spec:
        return None
    with _lock:
        if spec not in _injectors:
            _injectors[spec] = parse_spec(spec)
        return _injectors[spec]
