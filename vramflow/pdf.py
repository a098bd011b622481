"""Open PDFs and extract the text of each page, safely, in a small pool of worker processes.

Real PDFs are hostile: pypdf raises many kinds of exceptions on them, at open, when counting
pages or on one page only, and some pages take seconds or never finish. pypdf is pure Python and
cannot be interrupted from another thread, so the work runs in `vramflow.pdf_worker` processes
that are killed and replaced when a request outlives its time limit or when they die.

The functions are safe to call from many threads at once: each request checks an idle worker
out of a queue, so at most `configure_workers(n)` pages are extracted at the same time.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramflow.errors import (
    DocumentError,
    EncryptedPdfError,
    LimitExceededError,
    NotAPdfError,
)
from vramflow.pdf_file import check_file
from vramflow.pdf_pool import WorkerDiedError, WorkerPool

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 1024**2


@dataclass(frozen=True)
class DocumentInfo:
    """What `open_document` learned about a readable PDF."""

    path: Path  # resolved absolute path
    sha256: str  # hex digest of the file bytes
    size_bytes: int
    page_count: int
    encrypted: bool


@dataclass(frozen=True)
class PageText:
    """The text of one page and how its extraction went."""

    page_number: int  # 1-based
    text: str  # "" when failed or no text
    chars: int  # len(text.strip())
    extract_seconds: float
    status: str  # "ok" | "no_text" | "failed"
    error_type: str | None  # exception class name, e.g. "PdfReadError", "TimeoutError"
    error_message: str | None  # readable one-line message


_pool_lock = threading.Lock()
_pool: WorkerPool | None = None
_pool_size: int | None = None
_atexit_registered = False


def default_workers() -> int:
    """Worker processes used unless `configure_workers` says otherwise."""
    return min(2, os.cpu_count() or 1)


def configure_workers(n: int | None = None) -> None:
    """Use `n` worker processes (None: the default); running workers are stopped first."""
    global _pool_size
    if n is not None and n < 1:
        raise ValueError(f"need at least one PDF worker, got {n}")
    with _pool_lock:
        _pool_size = n
    shutdown_workers()


def shutdown_workers() -> None:
    """Stop the worker processes; the next request starts new ones."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def worker_stats() -> list[dict[str, Any]]:
    """Pid, readers opened and readers cached of each started worker (waits for idle ones)."""
    return _get_pool().stats()


def start_workers() -> None:
    """Start the worker processes now rather than when pages first need them."""
    _get_pool().start()


def _get_pool() -> WorkerPool:
    global _pool, _atexit_registered
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool(_pool_size or default_workers())
            if not _atexit_registered:
                atexit.register(shutdown_workers)
                _atexit_registered = True
        return _pool


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks so large files use little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def open_document(
    path: str | os.PathLike[str],
    password: str | None = None,
    *,
    max_file_bytes: int,
    max_pages: int,
    timeout_s: float,
    sha256: str | None = None,
) -> DocumentInfo:
    """Check that a file is a PDF vramflow can read and count its pages.

    Size, type and header are checked first (`pdf_file.check_file`), then the page count, and
    only then is the whole file read to hash it.

    `sha256`, when the caller has already hashed the file, saves reading it a second time.
    Raises only `vramflow.errors` exceptions: `NotAPdfError`, `EncryptedPdfError`,
    `LimitExceededError` or `DocumentError`, each with a message that names the file.
    """
    checked = check_file(path, max_file_bytes)
    resolved, size = checked.path, checked.size_bytes
    reply = _request(resolved, ("open", str(resolved), password, None), timeout_s, "opening")
    _, page_count, encrypted = reply
    if page_count > max_pages:
        raise LimitExceededError(
            f"{resolved} has {page_count:,} pages, more than the limit of {max_pages:,}"
        )
    try:
        digest = sha256 or file_sha256(resolved)
    except OSError as exc:
        raise _cannot_read(resolved, type(exc).__name__, exc.strerror or str(exc)) from exc
    return DocumentInfo(resolved, digest, size, page_count, encrypted)


def extract_page(
    path: str | os.PathLike[str],
    page_number: int,
    password: str | None = None,
    *,
    timeout_s: float,
) -> PageText:
    """Extract the text of one 1-based page; a page that fails comes back with status "failed".

    The time limit covers opening the document too when this worker has not opened it yet.
    A document that cannot be opened at all raises the same errors as `open_document`.
    """
    if page_number < 1:
        raise ValueError(f"page numbers start at 1, got {page_number}")
    resolved = _resolve(path)
    request = ("page", str(resolved), password, page_number)
    try:
        _, text, seconds, error_type, message = _request(resolved, request, timeout_s, None)
    except (TimeoutError, WorkerDiedError) as exc:
        return _failed_page(page_number, exc, timeout_s)
    return _page_text(page_number, text, seconds, error_type, message)


def _resolve(path: str | os.PathLike[str]) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop before Python 3.13
        raise _cannot_read(Path(path), type(exc).__name__, str(exc)) from exc


def _request(
    path: Path, request: tuple[Any, ...], timeout_s: float, doing: str | None
) -> tuple[Any, ...]:
    """Send a request to a worker; turn a document-level failure into a vramflow error.

    With `doing` set, timeouts and dead workers are document errors too; without it they are
    raised as they are, for the caller to report per page.
    """
    try:
        reply = _get_pool().request(request, timeout_s)
    except TimeoutError as exc:
        if doing is None:
            raise
        raise LimitExceededError(
            f"{path}: {doing} it took longer than the limit of {timeout_s:g} s"
        ) from exc
    except WorkerDiedError as exc:
        if doing is None:
            raise
        raise _cannot_read(path, type(exc).__name__, str(exc)) from exc
    if reply[0] == "error":
        raise _refusal(path, *reply[1:])
    return reply


def _refusal(path: Path, kind: str, error_type: str, message: str) -> DocumentError:
    """The vramflow error for a document the worker could not open."""
    if kind == "not_pdf":
        return NotAPdfError(f"{path} is not a readable PDF ({error_type}: {message})")
    if kind == "encrypted":
        return EncryptedPdfError(f"{path} is encrypted: pass its password")
    if kind == "wrong_password":
        return EncryptedPdfError(f"{path} is encrypted: wrong password")
    return _cannot_read(path, error_type, message)


def _cannot_read(path: Path, error_type: str, message: str) -> DocumentError:
    return DocumentError(f"{path}: cannot read the PDF ({error_type}: {message})")


def _page_text(
    page_number: int, text: str, seconds: float, error_type: str | None, message: str | None
) -> PageText:
    chars = len(text.strip())
    status = "ok" if chars else "no_text"
    if error_type is not None:
        status = "failed"
    return PageText(page_number, text, chars, seconds, status, error_type, message)


def _failed_page(page_number: int, exc: Exception, timeout_s: float) -> PageText:
    """A page whose worker was killed for taking too long, or died on its own."""
    if isinstance(exc, TimeoutError):
        message = f"extracting page {page_number} took longer than the limit of {timeout_s:g} s"
        log.warning("%s; its worker process was stopped", message)
        return PageText(page_number, "", 0, timeout_s, "failed", "TimeoutError", message)
    message = f"{exc} while extracting page {page_number}"
    log.warning("%s", message)
    return PageText(page_number, "", 0, 0.0, "failed", type(exc).__name__, message)


__all__ = [
    "DocumentInfo",
    "PageText",
    "configure_workers",
    "default_workers",
    "extract_page",
    "file_sha256",
    "open_document",
    "shutdown_workers",
    "worker_stats",
]
