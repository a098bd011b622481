"""Measure calls: how many run at once, how long the model (or the page work) was busy."""

from __future__ import annotations

import functools
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


class Intervals:
    """Records the intervals during which wrapped functions ran, from any thread.

    Busy time is the union of the intervals, so with one call at a time it is their sum and with
    overlapping calls it is the time during which at least one call ran.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self.reset()

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def measured(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._running += 1
                self.max_concurrent = max(self.max_concurrent, self._running)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                finished = time.perf_counter()
                with self._lock:
                    self._running -= 1
                    self.intervals.append((started, finished))
                self.after_call()

        return measured

    def after_call(self) -> None:
        """Hook for subclasses, run after every call."""

    def reset(self) -> None:
        """Forget the calls so far (the warm-up)."""
        with self._lock:
            self.intervals: list[tuple[float, float]] = []
            self.max_concurrent = 0

    @property
    def calls(self) -> int:
        return len(self.intervals)

    @property
    def busy_seconds(self) -> float:
        return self.busy_between(float("-inf"), float("inf"))

    def busy_between(self, low: float, high: float) -> float:
        """Busy time within [low, high] (`time.perf_counter` values)."""
        total, end = 0.0, low
        for start, finish in sorted(self.intervals):
            finish = min(finish, high)
            if finish <= end:
                continue
            total += finish - max(start, end)
            end = finish
        return total


class CallMeter(Intervals):
    """Wraps `model.generate` on one model instance: calls in flight and the torch VRAM peak."""

    def install(self, model: Any) -> None:
        model.generate = self.wrap(model.generate)

    def after_call(self) -> None:
        vram = _torch_peak_allocated()
        with self._lock:
            self._peak_vram = max(self._peak_vram, vram or 0)

    def reset(self) -> None:
        super().reset()
        self._peak_vram = 0

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
