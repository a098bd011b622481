"""A thread-safe pool of `vramflow.pdf_worker` processes with a time limit on every request.

Workers are fresh interpreters (`python -I -c ...`), never forks: the parent has torch, Prefect
and their threads loaded, and forking those is unsafe. `multiprocessing`'s "spawn" start method
is not used either because it imports the parent's `__main__` module into every child (for a
Prefect run that is the whole engine); a plain subprocess imports only pypdf and the worker.
Requests travel over a socket pair wrapped in a `multiprocessing` connection (POSIX only).
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from vramflow.errors import VramflowError

log = logging.getLogger(__name__)

# Importing pypdf on a busy 2-core machine can take a few seconds; a minute means it is stuck.
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 2.0
STATS_TIMEOUT_S = 10.0
# Isolated mode (-I) keeps the working folder and PYTHON* variables out of the worker's imports;
# the worker gets the parent's import path instead (PYTHONPATH included, as the parent read it),
# with this package's folder first, so it runs this very copy of vramflow.
_BOOT = "import sys; sys.path[:] = {path!r}; from vramflow.pdf_worker import main; main(sys.argv)"


def worker_import_path() -> list[str]:
    """The worker's `sys.path`: this package's folder, then the parent's own entries."""
    root = str(Path(__file__).resolve().parent.parent)
    return [root, *(entry for entry in sys.path if entry and entry != root)]


class WorkerDiedError(Exception):
    """A worker process ended while it was handling a request (killed for memory, crashed)."""


class Worker:
    """One worker process and the parent's end of its connection."""

    def __init__(self, start_timeout_s: float = START_TIMEOUT_S) -> None:
        ours, theirs = socket.socketpair()
        boot = _BOOT.format(path=worker_import_path())
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", boot, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self._wait_ready(start_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        try:
            if self.conn.poll(timeout_s):
                self.conn.recv()
                return
            problem = f"did not start within {timeout_s:g} s"
        except (EOFError, OSError):
            problem = f"ended at start ({self.exit_status()})"
        self.stop(kill=True)
        raise VramflowError(f"PDF worker process {problem}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def request(self, message: tuple[Any, ...], timeout_s: float) -> tuple[Any, ...]:
        """Send one request and wait for its reply; `TimeoutError` leaves the worker running."""
        try:
            self.conn.send(message)
            ready = self.conn.poll(timeout_s)
            if ready:
                return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerDiedError(f"worker process died ({self.exit_status()})") from exc
        raise TimeoutError(f"no reply within {timeout_s:g} s")

    def exit_status(self) -> str:
        """How the process ended, in words."""
        try:
            code = self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            return "still running, connection lost"
        if code < 0:
            with suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def kill_process(self) -> None:
        """Kill the process only; the thread using the connection sees it end and cleans up."""
        with suppress(OSError):
            self.process.kill()

    def stop(self, kill: bool = False) -> None:
        """Ask the process to exit (or kill it), wait for it, and close the connection."""
        if not kill:
            with suppress(OSError):
                self.conn.send(None)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                kill = True
        if kill:
            self.kill_process()
            self.process.wait()
        self.conn.close()


class WorkerPool:
    """Up to `size` workers, started when first needed and replaced when killed or dead.

    The queue holds one token per worker slot: an idle `Worker`, or None for a slot whose process
    is not running; a request takes a token, so at most `size` requests run at once.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots: queue.Queue[Worker | None] = queue.Queue()
        for _ in range(size):
            self._slots.put(None)
        self._lock = threading.Lock()
        self._busy: set[Worker] = set()
        self._closed = False

    def start(self) -> None:
        """Start every worker that is not running, side by side, and wait until all are ready.

        Otherwise each starts when a request first needs it: on a busy 2-core machine importing
        pypdf took 0.3-0.4 s, inside the first document that extracted pages side by side.
        A worker that cannot start is left to its first request, which reports why.
        """
        taken = [self._slots.get() for _ in range(self.size)]  # waits for busy workers
        ready: list[Worker | None] = []
        try:
            with ThreadPoolExecutor(self.size, thread_name_prefix="vramflow-pdf-start") as pool:
                ready = list(pool.map(self._started, taken))
        finally:
            for worker in ready or taken:
                self._slots.put(worker)

    def _started(self, worker: Worker | None) -> Worker | None:
        try:
            return self._usable(worker)
        except Exception as exc:
            log.warning("a PDF worker did not start: %s", exc)
            return None

    def request(self, message: tuple[Any, ...], timeout_s: float) -> tuple[Any, ...]:
        """Run one request on an idle worker; raises `TimeoutError` or `WorkerDiedError`."""
        worker = self._checkout()
        try:
            reply = worker.request(message, timeout_s)
        except BaseException:
            # Timed out, died or interrupted: the worker may still be busy, so never reuse it.
            self._return(worker, broken=True)
            raise
        self._return(worker, broken=False)
        return reply

    def _checkout(self) -> Worker:
        token = self._slots.get()
        try:
            worker = self._usable(token)
        except BaseException:
            self._slots.put(None)
            raise
        with self._lock:
            self._busy.add(worker)
        return worker

    def _usable(self, worker: Worker | None) -> Worker:
        """`worker` if it can take a request; otherwise it is stopped and a new one started in
        its place. Raises when the pool is closed or the new worker does not start."""
        if worker is not None and (self._closed or not worker.alive()):
            worker.stop(kill=not worker.alive())
            worker = None
        if worker is None:
            if self._closed:
                raise VramflowError("the PDF worker processes were shut down")
            worker = Worker()
        return worker

    def _return(self, worker: Worker, broken: bool) -> None:
        with self._lock:
            self._busy.discard(worker)
            closed = self._closed
        if broken or closed:
            worker.stop(kill=broken)
            self._slots.put(None)
        else:
            self._slots.put(worker)

    def close(self) -> None:
        """Stop idle workers and kill busy ones; their requests fail as `WorkerDiedError`."""
        with self._lock:
            self._closed = True
            busy = list(self._busy)
        for worker in busy:
            worker.kill_process()
        idle = []
        with suppress(queue.Empty):
            while True:
                idle.append(self._slots.get_nowait())
        for worker in idle:
            if worker is not None:
                worker.stop()
            # Hand the token back: a thread waiting for a worker wakes and sees the pool closed.
            self._slots.put(None)

    def stats(self) -> list[dict[str, Any]]:
        """Stats of every started worker; waits until all of them are idle."""
        taken = [self._slots.get() for _ in range(self.size)]
        try:
            return [
                worker.request(("stats", None, None, None), STATS_TIMEOUT_S)[1]
                for worker in taken
                if worker is not None and worker.alive()
            ]
        finally:
            for worker in taken:
                self._slots.put(worker)
