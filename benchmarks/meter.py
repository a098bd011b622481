"""Measure a model's `generate` calls: how many run at once, how long the model was busy."""

from __future__ import annotations

import functools
import resource
import sys
import threading
import time
from typing import Any


class CallMeter:
    """Wraps `model.generate` on one model instance and records every call's interval.

    Busy time is the union of the call intervals, so with one call at a time it is their sum and
    with overlapping calls it is the time during which at least one call ran.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._peak_vram = 0
        self.reset()

    def install(self, model: Any) -> None:
        original = model.generate

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._running += 1
                self.max_concurrent = max(self.max_concurrent, self._running)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                finished = time.perf_counter()
                vram = _torch_peak_allocated()
                with self._lock:
                    self._running -= 1
                    self.intervals.append((started, finished))
                    self._peak_vram = max(self._peak_vram, vram or 0)

        model.generate = generate

    def reset(self) -> None:
        """Forget the calls so far (the warm-up)."""
        with self._lock:
            self.intervals: list[tuple[float, float]] = []
            self.max_concurrent = 0
            self._peak_vram = 0

    @property
    def calls(self) -> int:
        return len(self.intervals)

    @property
    def busy_seconds(self) -> float:
        total, end = 0.0, float("-inf")
        for start, finish in sorted(self.intervals):
            if finish <= end:
                continue
            total += finish - max(start, end)
            end = finish
        return total

    @property
    def peak_vram_bytes(self) -> int | None:
        return self._peak_vram or None


def _torch_peak_allocated() -> int | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated())


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_stall_us() -> int | None:
    """Microseconds that runnable tasks on this machine waited for a CPU (Linux PSI), or None."""
    try:
        with open("/proc/pressure/cpu") as handle:
            some = handle.readline().split()
    except OSError:
        return None
    return int(some[-1].split("=")[1]) if some and some[0] == "some" else None


def device_name() -> str:
    """`cpu`, or the CUDA device's name."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:0 ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} torch threads)"
