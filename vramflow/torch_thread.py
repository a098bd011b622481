"""One thread per process makes vramflow's torch calls: loading, moving and running the model.

On the CPU torch runs its kernels on an OpenMP thread team that belongs to the calling thread and
stays after the call. Prefect's task runner calls from whichever worker thread runs the task, so
a process soon holds several teams, more OpenMP threads than cores, and libgomp then stops
spinning between parallel regions: each region waits for its threads to wake up. On 2 cores
generation ran 12-45 % slower once a second thread had made any parallel torch call (one small
matrix product is enough) than with every call made from one thread. On CUDA the one thread
also keeps one current device, stream and cuBLAS handle.

`run(fn, ...)` calls `fn` on that thread and waits for it; called from that thread it just calls.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread_id: int | None = None


def _forget_in_child() -> None:
    global _lock, _executor, _thread_id
    # A forked child has none of its parent's threads: it starts its own on first use.
    _lock, _executor, _thread_id = threading.Lock(), None, None


os.register_at_fork(after_in_child=_forget_in_child)


def _remember_thread() -> None:
    global _thread_id
    _thread_id = threading.get_ident()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:  # created on first use: nothing starts at import
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="vramflow-torch", initializer=_remember_thread
            )
        return _executor


def run(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` on the torch thread; its result, or its exception re-raised."""
    if is_torch_thread():
        return fn(*args, **kwargs)
    future = _pool().submit(fn, *args, **kwargs)
    try:
        return future.result()
    finally:
        # Interrupted while waiting: the call still uses the device (and the caller's slot)
        # until it ends, so the caller may not move on before it does.
        if not future.done():
            wait_for([future])
        del future  # a re-raised exception's traceback holds this frame: no cycle through it


def is_torch_thread() -> bool:
    """True on the thread `run` uses."""
    return threading.get_ident() == _thread_id
